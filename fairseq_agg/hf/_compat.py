"""Environment fixes needed before ``transformers`` is imported."""

import importlib.util
import sys


def hide_unloadable_torchaudio() -> None:
    """Makes an installed but unloadable ``torchaudio`` look absent.

    fairseq requires torchaudio, and pip keeps the newest release it finds (2.11.1) next to a
    newer torch (2.13), whose native library it cannot load: ``import torchaudio`` raises
    OSError. transformers imports torchaudio in every model module as soon as the package is
    installed, so no model could be built. ``sys.modules["torchaudio"] = None`` makes
    ``importlib.util.find_spec`` (transformers' availability check) report it missing. A
    torchaudio that loads is left alone.
    """
    if "torchaudio" in sys.modules:
        return
    try:
        if importlib.util.find_spec("torchaudio") is None:
            return
    except (ImportError, ValueError):
        return
    try:
        import torchaudio  # noqa: F401
    except Exception:  # OSError (native library), RuntimeError, ImportError
        for name in [n for n in sys.modules if n == "torchaudio" or n.startswith("torchaudio.")]:
            del sys.modules[name]
        sys.modules["torchaudio"] = None
