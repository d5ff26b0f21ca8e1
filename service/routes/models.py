"""`GET /models`: the loaded model and a summary of its manifest (thresholds, map scales, preprocessing)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.answers import model_summary
from service.deps import PipelineDep, require_api_key
from service.errors import NotReady, Unauthorized, problem_responses
from service.schemas import ModelSummary

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])


@router.get("/models", response_model=ModelSummary, responses=problem_responses(Unauthorized, NotReady),
            summary="The loaded model")
async def models(pipeline: PipelineDep) -> ModelSummary:
    return model_summary(pipeline)
