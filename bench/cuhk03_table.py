"""Recognition on real pictures: the paper's recipe beside the field's strong one, on the real CUHK03-detected
crops in ../shared.

Rows, each on the val split (camera 0 queries, camera 1 gallery, standard same-camera removal):

- paper: ``--recipe paper``, the paper's three stages (stage 1 triplet, stage 2 masks, stage 3 both) over E1+E2+E3
  epochs;
- strong: ``--recipe strong`` (BNNeck, ID loss with label smoothing, random erasing, warm-up then cosine decay,
  last stride 1, flip-averaged served template), stage 1 only, for ES epochs: trained alone, so that it gets about
  the training time of the three-stage rows (a stage-2 or stage-3 epoch costs several stage-1 epochs);
- strong + masks: the strong recipe with stages 2 and 3 (E1+E2+E3 epochs);
- strong + re-ranking: the strong row's final templates, ranked with k-reciprocal re-ranking;
- the reference network (retail-0265), measured on the same protocol (../shared/data/README.md).

Every trained row runs for every seed; the table gives the mean and the spread (sample standard deviation) of
the final epoch's figures (never the best epoch: picking the best on val would be tuning on the test set), the
true-match rate at a false-match rate of 1e-2 (the threshold calibrated on the same val pairs, as export does),
and each row's time in training steps and in all (with its evaluations).
Then the final weights of the best strong-recipe run are exported with their thresholds, loaded by the service
(``app.create_app``), the val gallery enrolled through ``POST /gallery`` and every query asked through
``POST /query``: the service's rank-1 identity must equal the offline evaluation's for every query.

    python bench/cuhk03_table.py --root ../shared/data/cuhk03-detected \\
        --pretrained ../shared/weights/mobilenet_v2_imagenet_features.safetensors

writes ``docs/RESULTS.md`` (``--results``), and in ``--out`` the runs, the exported weights and ``figure1.png``.
Run one torch process at a time on a 2-core machine: two at once run ten times slower. The defaults (160x80, the
first 7 trunk blocks frozen, epochs of 27 batches, E1+E2+E3 = 32+2+2, channels_last training steps, in bf16
autocast where the CPU has AVX-512 BF16 or AMX) were chosen from timed probes (docs/TRAINING.md, "Choosing the
CPU budget"). Measured in the 3-seed table on a 2-core Xeon with AMX: the paper row trained for 6.7 minutes, the
strong row 7.2 and the masks row 7.8 (means), the whole table took 72. A seed sets the initial weights and the
augmentation's draws; the P x K batch order is the same in every seed (the loaders are built once, with the sampler's
seed 0). ``--served-features RUN`` only compares the four served templates of a BNNeck run (before / after the
BNNeck, raw / L2-normalised).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import build_eval_transform, load_weights  # noqa: E402
from models.devices import resolve_device  # noqa: E402
from training.config import AMP_MODES, TrainConfig, recipe_config  # noqa: E402
from training.data import ImageDataset, build_dataset  # noqa: E402
from training.data.loaders import Loaders, build_loaders, val_loaders  # noqa: E402
from training.engine import build_networks, fit  # noqa: E402
from training.evaluation import euclidean_distmat, evaluate, extract_features  # noqa: E402
from training.export import export_weights, networks_from_run, threshold_provenance  # noqa: E402

logger = logging.getLogger("cuhk03_table")
FIGURES = ("rank1", "rank5", "mAP", "mINP")
# Intel Open Model Zoo person-reidentification-retail-0265 on the same split (../shared/data/README.md).
REFERENCE = {"rank1": 81.6, "mAP": 79.9}
ROWS = ("paper", "strong", "strong_masks")


@dataclasses.dataclass
class Budget:
    stage1: int  # E1: the three-stage rows' stage-1 epochs
    stage2: int  # E2
    stage3: int  # E3
    strong: int  # ES: the strong row's epochs (stage 1 only)

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> Budget:
        if "strong" not in data:
            raise ValueError(
                "this results.json comes from a table whose strong row forked from the masks row; rerun the table"
            )
        return cls(**data)


def build_table_loaders(base: TrainConfig, train_ids: int) -> tuple[TrainConfig, Loaders]:
    """The loaders; with ``train_ids``, training is cut to the first N identities (quick runs), through a
    manifest of the kept images in a temporary folder."""
    if train_ids:
        dataset = build_dataset(base.dataset, base.root, **base.dataset_kwargs)
        keep = set(sorted({s.pid for s in dataset.train})[:train_ids])
        splits = (("train", [s for s in dataset.train if s.pid in keep]), ("query", dataset.query))
        rows = [f"{s.path.resolve()},{s.pid},{s.camid},{split}" for split, samples in splits for s in samples]
        rows += [f"{s.path.resolve()},{s.pid},{s.camid},gallery" for s in dataset.gallery]
        root = Path(tempfile.mkdtemp(prefix="cuhk03_subset_"))
        (root / "manifest.csv").write_text("\n".join(["path,pid,camid,split", *rows]) + "\n")
        base = dataclasses.replace(base, root=str(root), dataset_kwargs={})
    return base, build_loaders(base)


class PooledTrunk(torch.nn.Module):
    """The trunk's globally pooled features, no head: (B, 3, H, W) -> (B, C)."""

    def __init__(self, extractor: torch.nn.Module) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor.pool(self.extractor.forward_features(x)).flatten(1)


def floor_figures(base: TrainConfig, loaders: Loaders) -> dict[str, float]:
    """Row 1: the ImageNet trunk's pooled features, no re-ID training."""
    device = resolve_device(base.device)
    extractor = build_networks(base, device, loaders.train_pids).extractor
    return evaluate(PooledTrunk(extractor), loaders.query, loaders.gallery, device)


def final_figures(history: list[dict[str, Any]]) -> dict[str, float]:
    return next(r for r in reversed(history) if "mAP" in r)


def _timed_fit(config: TrainConfig, loaders: Loaders, out: Path, resume: bool = False) -> tuple[Any, float]:
    start = time.perf_counter()
    _, state = fit(config, loaders, out, resume=resume)
    return state, time.perf_counter() - start


def _tmr(run: Path, loaders: Loaders) -> float:
    """TMR at FMR 1e-2 of a run's final weights, on the val pairs (export's calibration)."""
    extractor, _, _ = networks_from_run(run, "last")
    thresholds = threshold_provenance(extractor, loaders.query, loaders.gallery, "cpu")["thresholds"]
    return 100 * next(t["tmr"] for t in thresholds if t["fmr"] == 1e-2)


def train_seed(
    paper: TrainConfig, strong: TrainConfig, budget: Budget, loaders: dict[str, Loaders], out: Path, seed: int
) -> dict[str, dict[str, Any]]:
    """The trained rows of one seed, ``loaders`` per recipe (random erasing is the strong one's):
    {row: {"run", "figures", "tmr", "seconds"}}."""
    three_stages = (budget.stage1, budget.stage2, budget.stage3)
    root = out / f"seed{seed}"
    shutil.rmtree(root, ignore_errors=True)
    runs = {row: root / row for row in ROWS}
    configs = {
        "paper": dataclasses.replace(paper, epochs=three_stages, seed=seed),
        "strong": dataclasses.replace(strong, epochs=(budget.strong, 0, 0), stages=(1,), seed=seed, rerank=True),
        "strong_masks": dataclasses.replace(strong, epochs=three_stages, stages=(1, 2, 3), seed=seed),
    }
    rows: dict[str, dict[str, Any]] = {}
    for row, config in configs.items():
        state, seconds = _timed_fit(config, loaders["paper" if row == "paper" else "strong"], runs[row])
        rows[row] = {"figures": final_figures(state.history), "seconds": seconds}
    for row, run in runs.items():
        rows[row].update(run=str(run), tmr=_tmr(run, loaders["strong"]))
    return rows


SERVED = (("before", False), ("before", True), ("after", False), ("after", True))


def served_feature_figures(run: Path, loaders: Loaders) -> dict[str, dict[str, float]]:
    """A BNNeck run's final weights served four ways (before / after the BNNeck, raw / L2-normalised; the rest of
    its config kept): rank-1, mAP and TMR at FMR 1e-2 of each on the val split."""
    from models import FeatureExtractor
    from training.evaluation import calibrate_thresholds, evaluate_features, pair_distances

    extractor, _, _ = networks_from_run(run, "last")
    if not extractor.config.bnneck:
        raise ValueError(f"run {run} has no BNNeck: nothing to choose between")
    out = {}
    for neck_feat, normalize in SERVED:
        variant = FeatureExtractor(dataclasses.replace(extractor.config, neck_feat=neck_feat, normalize=normalize))
        variant.load_state_dict(extractor.state_dict())
        qf, q_pids, q_camids = extract_features(variant, loaders.query, torch.device("cpu"))
        gf, g_pids, g_camids = extract_features(variant, loaders.gallery, torch.device("cpu"))
        figures = evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids)
        genuine, impostor = pair_distances(qf, gf, q_pids, g_pids, q_camids, g_camids)
        tmr = calibrate_thresholds(genuine, impostor, (1e-2,))[0]["tmr"]
        name = f"{neck_feat} the BNNeck, {'L2-normalised' if normalize else 'raw'}"
        out[name] = {"rank1": figures["rank1"], "mAP": figures["mAP"], "tmr": 100 * tmr}
        logger.info("served %s: %s", name, out[name])
    return out


def service_check(weights: Path, base: TrainConfig, max_files: int = 64) -> dict[str, Any]:
    """Enroll the val gallery in the service, ask every query, compare the rank-1 identity with offline."""
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.main import create_app

    dataset = build_dataset(base.dataset, base.root, **base.dataset_kwargs)
    model = load_weights(weights)
    transform = build_eval_transform(model.config)
    loader = lambda samples: torch.utils.data.DataLoader(ImageDataset(samples, transform), batch_size=128)  # noqa: E731
    device = torch.device("cpu")
    qf, q_pids, _ = extract_features(model.extractor, loader(dataset.query), device)
    gf, g_pids, _ = extract_features(model.extractor, loader(dataset.gallery), device)
    offline = g_pids[euclidean_distmat(qf, gf).numpy().argmin(axis=1)]

    def upload(samples: Sequence) -> list[tuple[str, tuple[str, bytes, str]]]:
        return [("files", (s.path.name, s.path.read_bytes(), "image/jpeg")) for s in samples]

    with tempfile.TemporaryDirectory() as data_dir:
        # The app in this process only, reached by no network: no key to ask for.
        settings = Settings(data_dir=Path(data_dir), weights=weights, device="cpu", allow_unauthenticated=True)
        with TestClient(create_app(settings)) as client:
            by_pid: dict[int, list] = {}
            for s in dataset.gallery:
                by_pid.setdefault(s.pid, []).append(s)
            for pid, samples in by_pid.items():
                r = client.post("/gallery", files=upload(samples), data={"identity": str(pid), "camera": "1"})
                r.raise_for_status()
            served: list[int] = []
            for start in range(0, len(dataset.query), max_files):
                batch = dataset.query[start : start + max_files]
                files = [("file", f) for _, f in upload(batch)]
                r = client.post("/query", files=files, data={"top_k": "1"})
                r.raise_for_status()
                served += [int(res["matches"][0]["identity"]) for res in r.json()["results"]]
    served_arr = np.array(served)
    return {
        "queries": len(served),
        "gallery": len(dataset.gallery),
        "same_rank1_identity": int((served_arr == offline).sum()),
        "service_rank1": float((served_arr == q_pids).mean() * 100),
        "offline_rank1": float((offline == q_pids).mean() * 100),
    }


def mask_figure(run: Path, base: TrainConfig, path: Path) -> Path:
    """Figure 1 of the paper from a trained run: 8 val crops of different people, masks, hidden views."""
    from training.plots import mask_grid

    dataset = build_dataset(base.dataset, base.root, **base.dataset_kwargs)
    _, mask_generator, _ = networks_from_run(run, "last")
    transform = build_eval_transform(base.model_config())
    picked, seen = [], set()
    for s in dataset.query:
        if s.pid not in seen:
            seen.add(s.pid)
            picked.append(ImageDataset([s], transform)[0][0])
        if len(picked) == 8:
            break
    return mask_grid(mask_generator, torch.stack(picked), base.model_config(), path)


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {threads} torch threads, {gpu}; torch {torch.__version__}"


def training_seconds(run: Path) -> float:
    """A run's time in training steps, evaluations left out: its epochs' ``epoch_seconds`` in log.csv."""
    with open(run / "log.csv", newline="") as f:
        return sum(float(row["epoch_seconds"]) for row in csv.DictReader(f))


def _precision(config: dict[str, Any]) -> str:
    """How the training steps ran, from a run's config (tables from before ``--amp`` on the CPU ran fp32)."""
    amp = config.get("amp", "none")
    name = "fp32" if amp == "none" else f"{amp} autocast"
    return name + (", channels_last" if config.get("channels_last") else "")


def render(results: dict[str, Any]) -> str:
    """docs/RESULTS.md from the collected results (all figures measured by this run)."""
    args, seeds, budget = results["args"], results["seeds"], Budget.from_dict(results["budget"])
    e1, e2, e3 = budget.stage1, budget.stage2, budget.stage3

    def column(row: str, key: str, prefix: str = "") -> list[float]:
        return [seeds[s][row]["figures"][prefix + key] for s in seeds]

    names = {
        "paper": f"paper's recipe, three stages ({e1}+{e2}+{e3} epochs)",
        "strong": f"strong recipe ({budget.strong} epochs)",
        "strong_masks": f"strong recipe + masks, stages 2 and 3 ({e1}+{e2}+{e3} epochs)",
    }
    lines = [
        "# Recognition on real pictures: CUHK03-detected",
        "",
        "Written by `python bench/cuhk03_table.py` (the command below); every figure here was measured by that run.",
        "",
        "Data: the real CUHK03 crops in `../shared/data/cuhk03-detected` (detector boxes; 743 training identities,",
        "val = 100 other identities). Protocol: val only, camera 0 images are the queries"
        f" ({results['counts']['query']}), camera 1 images the gallery ({results['counts']['gallery']}),",
        "Euclidean distance between served templates, standard same-camera removal; rank-k, mAP, mINP and the",
        "true-match rate at a false-match rate of 1e-2 (TMR, cross-camera pairs) in percent. Figures are the final",
        "epoch's (never the best epoch on val), "
        + (
            f"mean ± standard deviation over seeds {', '.join(str(s) for s in seeds)}."
            if len(seeds) > 1
            else f"of one seed ({next(iter(seeds))}): no spread can be given."
        ),
        "",
        "| row | rank-1 | rank-5 | mAP | mINP | TMR at FMR 1e-2 | training / wall time per run |",
        "|---|---|---|---|---|---|---|",
        "| no re-ID training (ImageNet features) | "
        + " | ".join(f"{results['floor'][k]:.1f}" for k in FIGURES)
        + " | – | – |",
    ]
    for row in ROWS:
        cells = [_mean_spread(column(row, k)) for k in FIGURES]
        tmr = _mean_spread([seeds[s][row]["tmr"] for s in seeds])
        wall = statistics.mean(seeds[s][row]["seconds"] for s in seeds) / 60
        train = statistics.mean(training_seconds(Path(seeds[s][row]["run"])) for s in seeds) / 60
        lines.append(f"| {names[row]} | {' | '.join(cells)} | {tmr} | {train:.1f} / {wall:.1f} min |")
        if row == "strong":
            cells = [_mean_spread(column("strong", k, "rerank_")) for k in FIGURES]
            lines.append(f"| strong recipe + k-reciprocal re-ranking | {' | '.join(cells)} | – | (as above) |")
    ref = REFERENCE
    lines.append(
        f"| reference: person-reidentification-retail-0265 (256x128) | {ref['rank1']} | – | {ref['mAP']} | – | – | – |"
    )
    d_map = statistics.mean(column("strong_masks", "mAP")) - statistics.mean(column("strong", "mAP"))
    d_r1 = statistics.mean(column("strong_masks", "rank1")) - statistics.mean(column("strong", "rank1"))
    spread = max((statistics.stdev(column(r, "mAP")) for r in ("strong", "strong_masks") if len(seeds) > 1), default=0)
    if len(seeds) == 1:
        verdict = "with one seed there is no spread to judge this against, so it is no proof either way"
    elif abs(d_map) <= spread:
        verdict = "within the spread between seeds: on this budget the masks neither helped nor hurt measurably"
    else:
        verdict = "the masks helped" if d_map > 0 else "the masks hurt"
    strong_map, strong_r1 = statistics.mean(column("strong", "mAP")), statistics.mean(column("strong", "rank1"))
    goal = "reached" if strong_map >= 60 and strong_r1 >= 65 else "not reached"
    check = results["service_check"]
    lines += [
        "",
        f"**Did the masks help?** Strong + masks minus strong: mAP {d_map:+.1f} points, rank-1 {d_r1:+.1f} points; "
        f"{verdict}. Each row trains on its own for about the same time: the strong row {budget.strong} stage-1 "
        f"epochs, the masks row {e1} stage-1 epochs, then {e2} on the mask generator, then {e3} in which a share of "
        f"1 - lambda1 = {1 - results['config']['lambda1']:.2f} of its loss comes from images with the mask's top 30% "
        "hidden.",
        "",
        f"**Goal (strong recipe rank-1 >= 65, mAP >= 60):** {goal} (rank-1 {strong_r1:.1f}, mAP {strong_map:.1f}).",
        "",
        "## The service gives the same answers",
        "",
        f"The final weights of the best strong-recipe run were exported with their thresholds, loaded by the "
        f"service, the {check['gallery']} gallery crops enrolled through `POST /gallery` and the {check['queries']} "
        f"queries asked through `POST /query`: {check['same_rank1_identity']} of {check['queries']} queries got the "
        f"same rank-1 identity as offline evaluation (service rank-1 {check['service_rank1']:.1f}, offline "
        f"{check['offline_rank1']:.1f}).",
        "",
        "## Which feature to serve",
        "",
        "The best strong-recipe run's final weights served four ways (its flip averaging kept):",
        "",
        "| served template | rank-1 | mAP | TMR at FMR 1e-2 |",
        "|---|---|---|---|",
        *(
            f"| {name} | {f['rank1']:.1f} | {f['mAP']:.1f} | {f['tmr']:.1f} |"
            for name, f in results.get("served_features", {}).items()
        ),
        "",
        "## Settings",
        "",
        f"`{results['config']['model']['backbone']}` from its real ImageNet weights, input "
        f"{results['config']['model']['input_height']}x{results['config']['model']['input_width']}, the first "
        f"{results['config']['freeze_blocks']} trunk blocks frozen, U-Net base width "
        f"{results['config']['model']['unet_base_width']}, "
        f"P x K = {results['config']['p']} x {results['config']['k']}, "
        + (
            f"an epoch cut to {results['config']['epoch_batches']} batches (`--epoch-batches`), "
            if results["config"].get("epoch_batches")
            else ""
        )
        + f"warm-up {results['config']['warmup_epochs']} epoch(s) in the strong rows, "
        + f"training steps in {_precision(results['config'])}, evaluation in fp32, "
        f"extractor lr {results['config']['lr']} in every row. The strong recipe's settings: `training/config.py` "
        "(`RECIPES`), docs/TRAINING.md; how the input size, the frozen blocks and the epochs were chosen: "
        'docs/TRAINING.md, "Choosing the CPU budget".',
        "",
        "## Reproduce",
        "",
        "```bash",
        f"python bench/cuhk03_table.py {args}",
        "```",
        "",
        f"Machine: {results['machine']}. Total wall time {results['wall_minutes']:.0f} min. The run folder (`--out`) "
        "keeps each row's runs (`seedN/paper`, `seedN/strong`, `seedN/strong_masks`: log.csv, curves.png, "
        "masks_stage*.png), the exported weights (`best.safetensors`), `results.json` and `figure1.png` (the paper's "
        "figure 1 from the best strong + masks run). It is not committed: it shows real CUHK03 people, whose terms "
        "keep the pictures out of this repository.",
        "",
    ]
    return "\n".join(lines)


def _native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16, AMX); elsewhere oneDNN emulates it, slower than fp32."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private in torch 2.14: absent means no
    return bool(probe and probe())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/data/cuhk03-detected", help="folder with manifest.csv")
    parser.add_argument(
        "--pretrained",
        default="../shared/weights/mobilenet_v2_imagenet_features.safetensors",
        help="ImageNet weights of the trunk",
    )
    parser.add_argument("--out", default="runs/cuhk03-table", help="folder for the runs, weights and figure")
    parser.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"), help="the table's markdown file")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the trained rows")
    parser.add_argument("--epochs", default="32,2,2", help="E1,E2,E3: the three-stage rows' stage epochs")
    parser.add_argument(
        "--strong-epochs",
        type=int,
        default=46,
        help="ES: the strong row's stage-1 epochs, chosen to train about as long as the three-stage rows",
    )
    parser.add_argument("--backbone", default="mobilenet_v2", help="extractor trunk")
    parser.add_argument("--input-size", default="160x80", help="HxW of the network input")
    parser.add_argument("--unet-width", type=int, default=8, help="U-Net base width (paper: 32)")
    parser.add_argument("--freeze-blocks", type=int, default=7, help="leading trunk blocks kept frozen")
    parser.add_argument("--lr", type=float, default=3.5e-4, help="Adam lr of the extractor, every row")
    parser.add_argument("--warmup-epochs", type=int, default=4, help="the strong recipe's linear warm-up epochs")
    parser.add_argument(
        "--epoch-batches",
        type=int,
        default=27,
        help="cap every epoch at N P x K batches (0 = the whole training set); the mask stages cost several times "
        "a stage-1 epoch, so short epochs let a 10-minute run hold all three stages",
    )
    parser.add_argument("--train-ids", type=int, default=0, help="train on the first N identities only (0 = all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--amp",
        default="bf16" if _native_bf16() else "none",
        choices=AMP_MODES,
        help="mixed precision of the training steps; evaluation is fp32 (default: bf16 where the CPU has AVX-512 "
        "BF16 or AMX, else none)",
    )
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last networks"
    )
    parser.add_argument(
        "--finish", action="store_true", help="from OUT/results.json of a stopped run: export, check, figure, table"
    )
    parser.add_argument(
        "--served-features",
        default=None,
        metavar="RUN",
        help="only compare the four served features of a BNNeck run folder (before/after, raw/normalised) and exit",
    )
    return parser


def finish(results: dict[str, Any], out: Path) -> dict[str, Any]:
    """Export the best strong-recipe run's final weights with thresholds, check them in the service, draw figure 1."""
    if not results.get("seeds") or "started" not in results:
        raise ValueError(f"{out / 'results.json'} holds no finished seed or no start time: nothing to finish")
    Budget.from_dict(results["budget"])  # before minutes of work: render needs it
    base = TrainConfig.from_dict(results["config"])
    seeds = results["seeds"]
    best = max(
        ((s, r) for s in seeds for r in ("strong", "strong_masks")), key=lambda x: seeds[x[0]][x[1]]["figures"]["mAP"]
    )
    run = Path(seeds[best[0]][best[1]]["run"])
    weights = export_weights(run, out / "best.safetensors", root=base.root)
    results["service_check"] = service_check(weights, base)
    query, gallery = val_loaders(base)
    results["served_features"] = served_feature_figures(run, Loaders([], query, gallery))
    best_masks = max(seeds, key=lambda s: seeds[s]["strong_masks"]["figures"]["mAP"])
    mask_figure(Path(seeds[best_masks]["strong_masks"]["run"]), base, out / "figure1.png")
    results["wall_minutes"] = (time.time() - results["started"]) / 60
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.served_features:
        config = TrainConfig.from_dict(json.loads((Path(args.served_features) / "config.json").read_text()))
        query, gallery = val_loaders(config)
        figures = served_feature_figures(Path(args.served_features), Loaders([], query, gallery))
        sys.stdout.write(json.dumps(figures, indent=2) + "\n")
        return {"served_features": figures}
    if args.finish:
        if not (out / "results.json").is_file():
            raise FileNotFoundError(f"--finish needs {out / 'results.json'} from an earlier run")
        results = finish(json.loads((out / "results.json").read_text()), out)
        if args.results:
            Path(args.results).write_text(render(results))
        return results
    if args.threads:
        torch.set_num_threads(args.threads)
    for path, what in ((args.root, "data set root"), (args.pretrained, "ImageNet weights file")):
        if not Path(path).exists():
            raise FileNotFoundError(f"{what} {path} does not exist")
    h, w = (int(v) for v in args.input_size.lower().split("x"))
    epochs = args.epochs.split(",")
    if len(epochs) != 3 or not all(v.strip().isdigit() for v in epochs):
        raise ValueError(f"--epochs takes three whole numbers E1,E2,E3, got {args.epochs!r}")
    budget = Budget(*(int(v) for v in epochs), args.strong_epochs)
    out.mkdir(parents=True, exist_ok=True)
    model = {"backbone": args.backbone, "input_height": h, "input_width": w, "unet_base_width": args.unet_width}
    common = dict(
        dataset="folder",
        root=args.root,
        pretrained=args.pretrained,
        freeze_blocks=args.freeze_blocks,
        lr=args.lr,
        eval_every=0,  # each stage's end only
        epoch_batches=args.epoch_batches,
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
        workers=0,
        cache_images=True,  # decoded and resized once: loading a batch of 60 then takes 13 ms instead of 65
        dataset_kwargs={"query_camid": 0},
    )
    paper = recipe_config("paper", model, **common)
    strong = recipe_config("strong", model, **common, warmup_epochs=args.warmup_epochs)
    paper, loaders = build_table_loaders(paper, args.train_ids)
    strong = dataclasses.replace(strong, root=paper.root, dataset_kwargs=paper.dataset_kwargs)
    per_recipe = {"paper": loaders, "strong": build_loaders(strong)}
    results: dict[str, Any] = {
        "args": " ".join(argv if argv is not None else sys.argv[1:]),
        "started": time.time(),
        "config": strong.to_dict(),
        "budget": dataclasses.asdict(budget),
        "machine": _machine(),
        "counts": {"query": len(loaders.query.dataset), "gallery": len(loaders.gallery.dataset)},
        "floor": floor_figures(paper, loaders),
        "seeds": {},
    }
    logger.info("floor (ImageNet features): %s", results["floor"])
    for seed in (int(s) for s in args.seeds.split(",")):
        # Saved after each seed: a run stopped between seeds is completed with --finish.
        results["seeds"][str(seed)] = train_seed(paper, strong, budget, per_recipe, out, seed)
        logger.info("seed %d: %s", seed, json.dumps(results["seeds"][str(seed)]))
        (out / "results.json").write_text(json.dumps(results, indent=2))
    results = finish(results, out)
    if args.results:
        Path(args.results).write_text(render(results))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        run()
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
