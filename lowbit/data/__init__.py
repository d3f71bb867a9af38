"""Evaluation and calibration data shipped with the package (see README.md here for sources and licenses)."""
from pathlib import Path

DATA_DIR = Path(__file__).parent
WIKITEXT2_TEST = DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"
WIKITEXT2_VALID = DATA_DIR / "wikitext-2" / "valid.txt"
