# usage: python benchmarks/probe_soco_knn.py EPOCHS OUT [bn-batch] [-- soco.py flags, e.g. --tau 0.69, or DEMO.key=value]   (EPOCHS 0: probe the snapshots already in OUT)
"""Does the demo's SoCo pre-training learn anything? k-NN top-1 (k=20, cosine) of the backbone's
pooled C5 (and FPN P2-P5) features on held-out object-centric images, random init vs SoCo per epoch,
and the effective rank of those pooled features (a collapse measure)."""
import sys, time, shutil
from pathlib import Path
import torch, torch.nn.functional as F
sys.path.insert(0, ".")
import soco
from common.distributed import init_distributed
from common.synthetic import SyntheticDetection
torch.set_num_threads(1)
cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv); own, extra = sys.argv[:cut], sys.argv[cut + 1:]
epochs = int(own[1]); root = Path(own[2]); BN_BATCH = "bn-batch" in own; EVERY = 1 if epochs == 0 else 2
soco.DEMO = dict(soco.DEMO, epochs=epochs)
# extra: soco.py flags (e.g. --tau 0.69) and DEMO.key=value (e.g. DEMO.trust_coeff=0.016)
soco.DEMO.update({kv[5:].split("=")[0]: float(kv.split("=")[1]) for kv in extra if kv.startswith("DEMO.")})
extra = [x for x in extra if not x.startswith("DEMO.")]
args = soco.parse_args(["--demo", "--out", str(root), *extra])
env = init_distributed("cpu")
orig = soco.save_checkpoint
snaps = []
def save(path, obj):
    orig(path, obj)
    if Path(path).name == "soco_weights.pth":
        p = Path(path).with_name(f"w_{len(snaps):02d}.pth"); shutil.copy(path, p); snaps.append(p)
soco.save_checkpoint = save
a = soco.demo_pretrain_args(args, root, "selective_search", 1)
if epochs:
    soco.stage_proposals(a)
    c = time.process_time(); soco.stage_pretrain(a, env); print("pretrain cpu", time.process_time() - c, flush=True)
else:
    snaps = sorted((root / "pretrain_selective_search").glob("w_*.pth"))
train = SyntheticDetection(1000, 64, mode="object", seed=11).classification()
test = SyntheticDetection(500, 64, mode="object", seed=12).classification()
mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]; std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
def feats(enc, ds):
    enc.train() if BN_BATCH else enc.eval(); out = {"C5": [], "FPN": []}
    with torch.no_grad():
        for k in range(0, len(ds), 100):
            x = torch.stack([(ds[i][0].float() / 255 - mean) / std for i in range(k, min(len(ds), k + 100))])
            body = enc.backbone.body(x); fp = enc.backbone.fpn(body)
            out["C5"].append(body["3"].mean((2, 3)))
            out["FPN"].append(torch.cat([v.mean((2, 3)) for v in fp.values()], 1))
    return {k: F.normalize(torch.cat(v), dim=1) for k, v in out.items()}
ytr = torch.tensor([train[i][1] for i in range(len(train))]); yte = torch.tensor([test[i][1] for i in range(len(test))])
def knn(ftr, fte, k=20):
    sim = fte @ ftr.T; top, idx = sim.topk(k, 1)
    votes = torch.zeros(len(fte), int(ytr.max()) + 1).scatter_add_(1, ytr[idx], (top / 0.07).exp())
    return (votes.argmax(1) == yte).float().mean().item()
def probe(name, sd=None):
    torch.manual_seed(0)
    enc = soco.ObjectEncoder("fpn", "resnet18", head="2mlp", view_size=48, sampling_ratio=1, head_dim=256)
    if sd is not None:
        enc.load_state_dict({k.replace("roi_heads.", ""): v for k, v in sd.items()})
    a, b = feats(enc, train), feats(enc, test)
    print(f"{name}: kNN top-1 C5 {knn(a['C5'], b['C5']):.3f}  FPN {knn(a['FPN'], b['FPN']):.3f}  "
          f"effective rank C5 {soco.effective_rank(b['C5']):.1f}  FPN {soco.effective_rank(b['FPN']):.1f}", flush=True)
probe("random init")
print("BN", "batch statistics" if BN_BATCH else "running statistics")
for p in snaps[EVERY - 1::EVERY]:
    probe(p.name, torch.load(p, weights_only=True)["model"])
