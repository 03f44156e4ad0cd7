# The token script shared by ort_reference.py and tests/engine.rs (keep in sync with SCRIPT there).
PREFILL = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47]
STEPS = [2, 198, 1]
REWIND_AT = 6
REWIND_IDS = [30, 31]
