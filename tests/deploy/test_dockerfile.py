"""Static checks of Dockerfile.gpu and .dockerignore (no Docker engine here): what it copies exists and reaches the
build context, it installs the project's own dependency list, and hadolint-style hygiene."""

from __future__ import annotations

import json
import re
import sys
import tomllib

import pytest
from deployfiles import ROOT, DockerIgnore, copies, image_reference_pinned, parse_dockerfile
from packaging.requirements import Requirement

DOCKERFILE = ROOT / "Dockerfile.gpu"
SERVE, TRAIN = "serve", "train"


@pytest.fixture(scope="module")
def df():
    return parse_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_default_target_is_the_service(df) -> None:
    # `docker build` without --target builds the last stage.
    assert df.stages[-1].name == SERVE
    assert TRAIN in [s.name for s in df.stages]


def test_every_base_image_is_pinned(df) -> None:
    stage_names = {s.name for s in df.stages}
    for st in df.stages:
        if st.base in stage_names:
            continue
        assert "$" not in st.base, f"FROM {st.raw_base}: build arg without a default"
        reason = image_reference_pinned(st.base)
        assert reason is None, f"FROM {st.raw_base} → {st.base}: {reason}"


def test_cuda_base_matches_the_torch_wheel(df) -> None:
    # PyPI's Linux torch wheels for this release are CUDA 13.0 builds; a CUDA 12 base would pass the build and
    # then fail on the first kernel launch on hosts whose driver is too old for 13.0.
    base = df.global_args["BASE_IMAGE"]
    assert base.startswith("nvidia/cuda:13.0."), base
    assert re.search(r"-ubuntu\d\d\.\d\d$", base), base


def test_copy_sources_exist_and_are_in_the_build_context(df) -> None:
    ignore = DockerIgnore((ROOT / ".dockerignore").read_text())
    checked = 0
    for c in copies(df):
        if c.from_stage:
            continue
        for src in c.sources:
            path = ROOT / src
            assert path.exists(), f"Dockerfile.gpu:{c.line}: COPY source {src} does not exist"
            assert not ignore.excluded(src), f"Dockerfile.gpu:{c.line}: {src} is excluded by .dockerignore"
            if path.is_dir():
                files = [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
                assert files, f"{src} is empty"
                left_out = [str(p.relative_to(ROOT)) for p in files if ignore.excluded(str(p.relative_to(ROOT)))]
                assert not left_out, f".dockerignore drops files COPY {src} needs: {left_out[:5]}"
            checked += 1
    assert checked >= 5


def test_dockerignore_keeps_data_and_secrets_out() -> None:
    ignore = DockerIgnore((ROOT / ".dockerignore").read_text())
    for path in ["data/OCT2017/train/NORMAL/x.jpeg", "model_store/vqvae/1/model.pt", "saved_models/run/best.ckpt",
                 ".venv/bin/python", ".git/config", "docker/.env", "service/__pycache__/main.cpython-312.pyc",
                 "tests/conftest.py"]:
        assert ignore.excluded(path), f"{path} would be sent to the Docker daemon"


def test_images_install_from_their_lock_files(df, pyproject) -> None:
    """Each image installs its extra's lock file (hash-checked, nothing outside it), then the project without
    dependencies: no `pip install NAME` and no `.[extra]` resolve that could pull an unlocked release."""
    installs: dict[str, list[str]] = {}
    for st in df.stages:
        for ins in st.all("RUN"):
            assert "pip install" not in ins.args, f"{st.name}: {ins.args!r}: install through pip-install-locked"
            m = re.search(r"pip-install-locked (\S+)", ins.args)
            if m:
                installs.setdefault(st.name, []).append(m.group(1))
    assert installs == {"build-serve": ["requirements-serve.lock"], "build-train": ["requirements-train.lock"]}
    helper = (ROOT / "docker" / "pip-install-locked.sh").read_text()
    assert any(c.stage == "builder" and c.sources == ["docker/pip-install-locked.sh"]
               and c.dest == "/usr/local/bin/pip-install-locked" for c in copies(df))
    assert 'pip install --require-hashes --no-deps -r "$lock"' in helper
    assert "pip install --no-deps --no-build-isolation ." in helper
    # The project files pip needs are copied into the stage lineage before it installs.
    builder_copies = [src for c in copies(df) if c.stage == "builder" for src in c.sources]
    for needed in ("pyproject.toml", "requirements-serve.lock", "requirements-train.lock"):
        assert needed in builder_copies, needed
    readme = pyproject["project"].get("readme")
    if readme:
        assert readme in builder_copies, "pyproject names a readme; building the wheel needs it"
    # The runtime stages take the virtualenv those installs produced.
    assert any(c.stage == SERVE and c.from_stage == "build-serve" for c in copies(df))
    assert any(c.stage == TRAIN and c.from_stage == "build-train" for c in copies(df))


def test_torch_index_url_reaches_the_installs(df) -> None:
    """docker-compose.cpu.yml builds with TORCH_INDEX_URL: a build argument is seen by RUN only in a stage that
    declares it (an ARG does not carry over into a stage built FROM another)."""
    for name in ("build-serve", "build-train"):
        assert "TORCH_INDEX_URL" in df.stage(name).args, f"{name} does not declare ARG TORCH_INDEX_URL"


def test_serve_image_leaves_training_out(df) -> None:
    serve_sources = {src for c in copies(df) if c.stage in ("build-serve", "builder") for src in c.sources}
    assert "training" not in serve_sources, "the service image must not ship (or be able to import) training/"


@pytest.mark.parametrize("stage", [SERVE, TRAIN])
def test_runs_as_non_root(df, stage) -> None:
    users = [ins.args.split(":")[0] for st in reversed(df.lineage(stage)) for ins in st.all("USER")]
    assert users, f"stage {stage} never sets USER"
    assert users[-1] not in ("root", "0"), f"stage {stage} runs as {users[-1]}"


def test_service_stage_contract(df) -> None:
    from service.settings import Settings

    serve = df.stage(SERVE)
    env = df.effective_env(SERVE)
    assert serve.all("CMD")[-1].words() == ["python", "-m", "service"]
    assert (ROOT / "service" / "__main__.py").is_file(), "CMD python -m service needs service/__main__.py"
    # Env names the image sets are real settings.
    fields = {f"OCT_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in env if k.startswith("OCT_")} <= fields
    port = int(env["OCT_PORT"])
    assert [int(p.split("/")[0]) for ins in serve.all("EXPOSE") for p in ins.words()] == [port]
    assert env["OCT_HOST"] == "0.0.0.0", "inside a container the service must listen beyond loopback"
    volumes = [v for ins in serve.all("VOLUME") for v in ins.words()]
    assert env["OCT_MODEL_STORE"] in volumes, "the model store is a volume"
    assert env["OCT_RESULTS_DIR"] in volumes


def test_healthcheck_probes_readiness(df) -> None:
    hc = df.stage(SERVE).all("HEALTHCHECK")
    assert len(hc) == 1
    options, _, command = hc[0].args.partition(" CMD ")
    assert json.loads(command) == ["oct-healthcheck", "/readyz"]
    # The probe is installed under that name.
    assert any(c.dest == "/usr/local/bin/oct-healthcheck" and c.sources == ["docker/healthcheck.py"]
               for c in copies(df))
    assert re.search(r"--start-period=\d+s", options), "loading + warm-up needs a start period"


def test_apt_hygiene(df) -> None:
    for st in df.stages:
        for ins in st.all("RUN"):
            if "apt-get install" in ins.args:
                assert "--no-install-recommends" in ins.args, f"line {ins.line}"
                assert "-y" in ins.args.split(), f"line {ins.line}"
                assert "rm -rf /var/lib/apt/lists" in ins.args, f"line {ins.line}: apt lists left in the layer"
                assert "apt-get update" in ins.args, f"line {ins.line}: install without update in the same layer"
        assert not [i for i in st.all("ADD") if "://" in i.args], "ADD of a URL: use a checked download"


def test_entrypoint_scripts_are_executable() -> None:
    for name in ("docker/entrypoint.sh", "docker/healthcheck.py"):
        p = ROOT / name
        assert p.stat().st_mode & 0o111, f"{name} is not executable"
        assert p.read_text().startswith("#!"), f"{name} has no shebang"


def _closure(requirements: list[str]) -> set[str]:
    """Normalised names of the installed distributions these requirements pull in (recursively)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    stack = [(Requirement(r), "") for r in requirements]
    while stack:
        req, via_extra = stack.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": via_extra}):
            continue
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            continue  # e.g. a platform-only dependency; the import check below still catches what is used
        for sub in dist.requires or []:
            sub_req = Requirement(sub)
            for extra in sorted(req.extras) or [""]:
                stack.append((sub_req, extra))
    return {k.split("[", 1)[0] for k in seen}


def _imported_top_level(package: str) -> dict[str, str]:
    import ast

    out: dict[str, str] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                out.setdefault(n.split(".")[0], str(path.relative_to(ROOT)))
    return out


def test_serve_extra_covers_what_the_service_imports(pyproject) -> None:
    """The serve image installs `.[serve]` and nothing else: every third-party module service/ and octcore/
    import must come from the core dependencies or the serve extra (or their dependencies)."""
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    project = pyproject["project"]
    available = _closure(project["dependencies"] + project["optional-dependencies"]["serve"])
    owners = packages_distributions()
    missing = {}
    imports = {**_imported_top_level("octcore"), **_imported_top_level("service")}
    assert "training" not in imports, f"{imports.get('training')} imports training"
    for module, where in imports.items():
        if module in sys.stdlib_module_names or module in ("octcore", "service", "__future__"):
            continue
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        if not dists:
            missing[module] = f"{where} (not installed at all)"
        elif not dists & available:
            missing[module] = f"{where} (from {sorted(dists)}, not in core deps or the serve extra)"
    assert not missing, f"the serve image would lack: {missing}"


def test_orthanc_image() -> None:
    """The `pacs` profile's Orthanc: pinned Debian base, the packages the PACS tests use, non-root, and the config
    path it starts with is where compose mounts docker/orthanc/orthanc.json."""
    odf = parse_dockerfile(ROOT / "docker" / "Dockerfile.orthanc")
    (stage,) = odf.stages
    assert image_reference_pinned(stage.base) is None, stage.base
    run = " ".join(i.args for i in stage.all("RUN"))
    assert re.search(r"apt-get install -y --no-install-recommends .*\borthanc\b.*\borthanc-dicomweb\b", run)
    assert "rm -rf /var/lib/apt/lists" in run
    assert stage.all("USER")[-1].args not in ("root", "0")
    assert stage.all("ENTRYPOINT")[-1].words() == ["Orthanc"]
    assert stage.all("CMD")[-1].words() == ["/etc/orthanc/orthanc.json"]
    assert not copies(odf), "the configuration is mounted, not baked in"


def test_the_serving_image_carries_every_version_of_the_shipped_model(df) -> None:
    """The scorer serves the shipped model on first start, with nothing in its volume: the serve stage copies the
    whole model folder (every version present, card included) into the image's own store, root-owned (read-only for
    the service's user), and tells the entrypoint where that store is."""
    from octcore.manifest import list_versions
    from service.settings import SHIPPED_MODEL

    ignore = DockerIgnore((ROOT / ".dockerignore").read_text())
    store = df.effective_env(SERVE)["IMAGE_MODEL_STORE"]
    (ins,) = [c for c in copies(df) if c.stage == SERVE and c.sources == [f"model_store/{SHIPPED_MODEL}"]]
    assert ins.dest.rstrip("/") == f"{store}/{SHIPPED_MODEL}"
    line = DOCKERFILE.read_text().splitlines()[ins.line - 1]
    assert "--chown" not in line and "--chmod" not in line, "the image's store must not be writable by the service"
    versions = list_versions(ROOT / "model_store", SHIPPED_MODEL)
    assert versions, "no shipped version to carry"
    for v in versions:
        for f in (ROOT / "model_store" / SHIPPED_MODEL / str(v)).iterdir():
            rel = f.relative_to(ROOT).as_posix()
            assert not ignore.excluded(rel), f".dockerignore keeps {rel} out of the image"
    for other in ("model_store/phantom/1/model.pt", "model_store/vqvae/1/manifest.json", "model_store/README.md"):
        assert ignore.excluded(other), f"{other} would be sent to the Docker daemon"
    assert TRAIN not in {c.stage for c in copies(df) if SHIPPED_MODEL in " ".join(c.sources)}
