import sys
import torch
torch.set_num_threads(1)
from pipeline.checkpoint import model_from_checkpoint
from pipeline.protocols import evaluate_image_matching
m = model_from_checkpoint(sys.argv[1])[0].eval()
r = evaluate_image_matching(str(__import__("pathlib").Path(__file__).resolve().parents[2] / "data" / "oxford_graf"), {(sys.argv[2] if len(sys.argv) > 2 else "hardnet-varied-61k"): m}, sift=True, max_keypoints=2000, seed=0, progress=False)
print(r.table())
