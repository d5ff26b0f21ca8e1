"""Code shared by training and serving: preprocessing and the model_store contract. Nothing else lives here."""
