"""Replay the discrepancy stop on finished plain-DIP runs: for each run, the PSNR of one run
stopped at the first logged step where mse(x_hat, y) <= factor * v, for several factors and
three choices of the noise variance v:

  sigma2     sigma^2, the noise before clipping;
  clipped_y  the variance left after clipping to [0, 1], at the observation's values
             (what `early_stop=discrepancy` uses when data.clip is true);
  clipped_x  the same at the clean image's values (an oracle: it reads the clean image).

It reads each job's curve.csv (`psnr`, and `psnr_noisy`: the PSNR of the returned image against
the observation), clean.png, noisy.png (8-bit, so y is the observation rounded to 1/255) and
result.json (the job's data.sigma), so it needs the job folders of a sweep such as
`experiment=denoise/zero_shot` run with method=dip. Beside the stops it prints the two clipped
variances over sigma^2 (v_y, v_x).

    python scripts/discrepancy_table.py outputs/sweeps/denoise/zero_shot/faithful --factors 0.9,0.92,0.94,0.96
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from skimage import io as skio

from dipddpm.early_stop import clipped_noise_variance

VARIANCES = ("sigma2", "clipped_y", "clipped_x")


def dip_jobs(roots: list[Path]) -> list[Path]:
    """Job folders under roots holding a finished DIP run without a stopping rule (its curve
    covers every step) and with a curve.csv."""
    jobs = []
    for root in roots:
        for result in sorted(root.rglob("result.json")):
            record = json.loads(result.read_text(encoding="utf-8"))
            unstopped = (record.get("config") or {}).get("early_stop.name") == "none"
            if (record.get("method") == "dip" and record.get("status") == "ok" and unstopped
                    and (result.parent / "curve.csv").is_file()):
                jobs.append(result.parent)
    return jobs


def replay(job: Path, factors: list[float]) -> dict:
    """{"image", "best", "last", (factor, variance): PSNR at the stop} for one job."""
    record = json.loads((job / "result.json").read_text(encoding="utf-8"))
    sigma = float(record["config"]["data.sigma"])   # result.json keeps the config flat, dotted keys
    clean = torch.from_numpy(skio.imread(job / "clean.png") / 255.0)
    noisy = torch.from_numpy(skio.imread(job / "noisy.png") / 255.0)
    with open(job / "curve.csv", newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["psnr"] and row["psnr_noisy"]]
    psnr = np.array([float(row["psnr"]) for row in rows])
    mse = 10.0 ** (-np.array([float(row["psnr_noisy"]) for row in rows]) / 10.0)   # to y, data range 1
    variance = {"sigma2": sigma ** 2,
                "clipped_y": float(clipped_noise_variance(noisy, sigma).mean()),
                "clipped_x": float(clipped_noise_variance(clean, sigma).mean())}
    out = {"image": record["metrics"].get("image", job.name), "best": psnr.max(), "last": psnr[-1],
           "v_y": variance["clipped_y"] / sigma ** 2, "v_x": variance["clipped_x"] / sigma ** 2}
    for factor in factors:
        for name in VARIANCES:
            below = np.nonzero(mse <= factor * variance[name])[0]
            out[(factor, name)] = psnr[below[0]] if below.size else psnr[-1]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", type=Path, help="sweep folders holding method=dip jobs")
    parser.add_argument("--factors", default="0.9,0.92,0.94,0.96", help="comma-separated factors")
    args = parser.parse_args(argv)
    factors = [float(text) for text in args.factors.split(",")]
    results = [replay(job, factors) for job in dip_jobs(args.roots)]
    if not results:
        parser.error("no finished method=dip job with a curve.csv under " + ", ".join(map(str, args.roots)))
    columns = [(f, v) for f in factors for v in VARIANCES]
    print("| image | v_y | v_x | oracle best | last | " + " | ".join(f"{f} x {v}" for f, v in columns) + " |")
    print("|---" * (5 + len(columns)) + "|")
    mean = {key: np.mean([r[key] for r in results]) for key in ["v_y", "v_x", "best", "last", *columns]}
    for r in sorted(results, key=lambda r: r["image"]) + [dict(mean, image=f"mean of {len(results)}")]:
        print(f"| {r['image']} | {r['v_y']:.3f} | {r['v_x']:.3f} | {r['best']:.2f} | {r['last']:.2f} | "
              + " | ".join(f"{r[c]:.2f}" for c in columns) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
