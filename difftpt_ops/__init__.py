"""difftpt-ops: test-time prompt tuning of CLIP (zero-shot, TPT, DiffTPT) as a resumable system."""

__version__ = "0.1.0"
