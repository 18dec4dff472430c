"""ONNX Runtime against gitseg's PyTorch engine on this CPU (issue 36): the same ensemble and case-day.

    python benchmarks/bench_onnx.py --ensemble runs/demo/search/demo/ensemble --data runs/demo/data

Exports the ensemble with `gitseg export --onnx` into a temporary folder, then times `predict_scan`
(the whole path from the raw scan to the post-processed masks: preprocessing, windows, every member
with the ensemble's TTA, resizing, thresholds) on one case-day of `--split`, after one warm-up
call, the median of `--repeats` calls, for:

- **PyTorch, as shipped** (the baseline): BatchNorm folded, channels_last, bfloat16 autocast on a CPU
  with native bf16 (float32 elsewhere);
- **PyTorch, float32** (autocast off): separates the runtime's effect from the precision's;
- **ONNX Runtime, float32** (`--runtime onnx`);
- **ONNX Runtime, int8** (with `--int8`): each member's weights quantised by ONNX Runtime's dynamic
  quantisation; reported as usable only where its masks agree with float32 ONNX (Dice >= 0.99 per organ).

Prints slices per second, the ratio to the baseline, and per organ the Dice between each runtime's
masks and the baseline's, and the largest probability difference. Protocol and results:
BENCHMARKS.md, "ONNX Runtime".
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def timed(engine, image: np.ndarray, repeats: int):
    engine.predict_scan(image)  # warm-up: sessions, graph optimisation, caches
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = engine.predict_scan(image)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def quantised(folder: Path, out: Path) -> Path:
    """A copy of the ONNX export with every member's weights quantised to int8 (dynamic quantisation)."""
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ensemble.deploy.runtime import ONNX_MANIFEST, sha256

    shutil.copytree(folder, out)
    record = json.loads((out / ONNX_MANIFEST).read_text())
    for member in record["members"]:
        path = out / member["onnx"]
        quantize_dynamic(str(folder / member["onnx"]), str(path), weight_type=QuantType.QInt8)
        member["sha256"] = sha256(path)
    (out / ONNX_MANIFEST).write_text(json.dumps(record, indent=1))
    return out


def main() -> None:
    import torch

    from ensemble.deploy.export import export_onnx
    from ensemble.deploy.runtime import OnnxEnsemble
    from ensemble.model import EnsembleModel
    from gitseg.data.uwmgi import index_root, volume_from_rows
    from gitseg.infer import cpu_has_native_bf16, device_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ensemble", required=True, help="an ensemble or distilled student folder")
    parser.add_argument("--data", required=True, help="a UWMGI tree")
    parser.add_argument("--split", default="test", choices=("test", "train"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--int8", action="store_true", help="also ONNX Runtime with int8 weights")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    machine = (f"{device_name(torch.device('cpu'))}; AVX-512: {'avx512f' in flags}; native bf16: "
               f"{cpu_has_native_bf16()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    import onnxruntime

    print(f"commit {commit}; {machine}; onnxruntime {onnxruntime.__version__}; python {platform.python_version()}")
    slices, _ = index_root(args.data, args.split)
    case_day = slices["case_day"].iloc[0]
    image = volume_from_rows(slices[slices["case_day"] == case_day]).image
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_onnx(args.ensemble, Path(tmp) / "onnx", log=lambda *_: None)
        shipped = EnsembleModel.load(args.ensemble, "cpu")
        fp32 = EnsembleModel.load(args.ensemble, "cpu")
        fp32.amp = False
        engines = {"PyTorch as shipped": shipped, "PyTorch float32": fp32,
                   "ONNX Runtime float32": OnnxEnsemble.load(folder, "cpu")}
        if args.int8:
            engines["ONNX Runtime int8"] = OnnxEnsemble.load(quantised(folder, Path(tmp) / "int8"), "cpu")
        print(f"{case_day}: {image.shape[0]} slices of {image.shape[1]} x {image.shape[2]}; "
              f"{len(shipped.members)} members, TTA {shipped.tta}; median of {args.repeats} after a warm-up")
        results = {}
        for name, engine in engines.items():
            seconds, (probs, masks) = timed(engine, image, args.repeats)
            results[name] = {"seconds": seconds, "slices_per_s": image.shape[0] / seconds, "probs": probs,
                             "masks": masks}
    base = results["PyTorch as shipped"]
    rows = []
    for name, r in results.items():
        row = {"runtime": name, "slices_per_s": r["slices_per_s"], "ratio": r["slices_per_s"] / base["slices_per_s"],
               "dice": [dice(r["masks"][c], base["masks"][c]) for c in range(3)],
               "max_prob_diff": float(np.abs(r["probs"].astype(np.float32) - base["probs"].astype(np.float32)).max())}
        if name == "ONNX Runtime int8":
            ref = results["ONNX Runtime float32"]
            row["dice_vs_onnx_fp32"] = [dice(r["masks"][c], ref["masks"][c]) for c in range(3)]
            row["holds_the_masks"] = min(row["dice_vs_onnx_fp32"]) >= 0.99
        rows.append(row)
        print(f"  {name:<22} {row['slices_per_s']:7.1f} slices/s  x{row['ratio']:.2f}  Dice vs shipped "
              + " / ".join(f"{d:.4f}" for d in row["dice"]) + f"  largest |dp| {row['max_prob_diff']:.4f}"
              + (f"  int8 holds the masks: {row['holds_the_masks']}" if "holds_the_masks" in row else ""))
    if args.out:
        Path(args.out).write_text(json.dumps({"commit": commit, "machine": machine, "case_day": case_day,
                                              "slices": int(image.shape[0]), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
