"""HuggingFace checkpoint -> ArrowEngine model directory (``arrowengine convert``/``inspect``).

    from convert.pipeline import convert_checkpoint
    convert_checkpoint("path/or/hub-id", "models/name", dtype="keep", fmt="arrow")
"""
