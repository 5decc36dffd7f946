"""wan_mini: a small Wan2.1 (real diffusers architecture) trained on procedural videos whose prompts say what
happens, so quantization errors show up as wrong colors, shapes or motion rather than only as numbers.

data.py draws the videos, train.py trains and saves the diffusers folder, score.py measures whether a video
follows its prompt, folder.py finds and checks the trained folder, report.py writes its model card.
"""
