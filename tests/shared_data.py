"""Where the tests find the real Omniglot minimal splits: ``../shared/data/omniglot`` beside the
checkout (or $METAPHI_OMNIGLOT). Tests that need them skip, saying so, when they are absent."""
import os
from pathlib import Path

OMNIGLOT = Path(os.environ.get("METAPHI_OMNIGLOT") or Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot")
