"""The registry stage: MLflow runs (`tracking`), registered versions with the champion gate and
checksum-verified pulls (`versions`), and the pickle-free pyfunc package (`pyfunc_package`,
`pyfunc_model`). `pipelines.registry.pull` / `register_run` are `versions`' own, loaded on first use
so that `pipelines.registry.tracking` stays light (the CLI checks a server before torch loads)."""
from typing import Any

_VERSIONS = ("RegisterRequest", "RegistryError", "register_run", "pull")


def __getattr__(name: str) -> Any:
    if name in _VERSIONS:
        from pipelines.registry import versions

        return getattr(versions, name)
    raise AttributeError(f"module 'pipelines.registry' has no attribute {name!r}")
