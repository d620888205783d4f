"""A small real generation run: ~16 shapes, index VAE + index DiT + SS-DiT trained for a time budget, each shape
generated from one of its training views, scored by Chamfer retrieval among the shapes (issue 6).

Two commands, run from the repository root with PYTHONPATH=$PWD:

  prepare  (the CPU machine: needs the corpus packages and open3d)
      python benchmarks/generation_retrieval.py prepare --data .dev/gen16data
    `python -m data_prep.corpus` (5 real meshes + 11 CSG shapes) -> `python -m data_prep` (sparse SDF at 256,
    8 renders at 518^2, one shard) -> gt_points.npz (surface samples of the `reference_surface` of each
    normalised reference mesh, the frame of the SDF) ; the per-sample copies and the mesh files are removed
    (the shards hold everything).

  run  (the GPU machine; every stage is a real entry point or library API)
      python benchmarks/generation_retrieval.py run --vae VAE_RUN --data .dev/gen16data --out OUT --work /tmp/gen16 \
          --budget-s 420
    1 dino        a randomly initialised DINOv2-with-registers (transformers config, fixed seed; no weights can
                  be downloaded), saved with save_pretrained so every later stage loads the same encoder
    2 encode      python -m data_prep.encode_latents features=precompute (VAE posterior means + tokens)
    3 stats       python -m data_prep.latent_stats
    4 index_vae   python train.py experiment=index_vae_small   (time-boxed with +trainer.max_time)
    5 index_dit   python train.py experiment=index_dit_small      (after index_vae)
    6 sparse_dit  python train.py experiment=dit_256_small        (beside 4 and 5 on the same GPU)
    7 generate    d3ds2.pipeline.ImageTo3DPipeline on one training view per shape (batched) with the first
                  --guidance, then the 16 x 16 Chamfer matrix generated vs reference and the top-1 retrieval
                  (d3ds2.eval.retrieval)
    8 reconstruct the VAE's own reconstructions of the reference latents, scored the same way (upper bound)
    9 generate_more  the other --guidance values, while the budget lasts
    The training stages get what is left of --budget-s after the fixed stages minus --reserve-s (kept for
    generation, scoring and the reconstruction): the SS-DiT all of it, the index VAE 0.35 then the index DiT
    the rest (--sequential: one after the other, 0.2 / 0.3 / 0.5).
    --out receives four files, rewritten after every stage (partial results survive a timeout; a failed stage
    writes its error there, the stages that need it are skipped): retrieval.json, retrieval.md, logs.tar.gz
    (stage logs, training CSVs and configs), points.npz (the surface samples that were scored: generated_g<G>
    and reconstructed, [shapes, N, 3] float16, NaN for a mesh without surface; names). Everything heavy
    (DINOv2 weights, latent shards, checkpoints, the meshes as PLY) stays in --work.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars (ours, the pipeline's, transformers') in the log
from d3ds2.models.conditioner import DINOV2_L_REG_CONFIG  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN_NAME = "gen"
DINO_CONFIGS = {  # transformers Dinov2WithRegistersConfig kwargs of the random-weight encoder
    "large": DINOV2_L_REG_CONFIG,  # the official encoder's architecture (DINOv2-L/14 with registers)
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=518, patch_size=14,
                 num_register_tokens=4),
}
EXPERIMENTS = {  # --models -> experiment of each training stage
    "small": {"index_vae": "index_vae_small", "index_dit": "index_dit_small", "sparse_dit": "dit_256_small"},
    "tiny": {"index_vae": "index_vae_tiny", "index_dit": "index_dit_tiny", "sparse_dit": "dit_tiny"},
}
TRAIN_SHARE = {"index_vae": 0.2, "index_dit": 0.3, "sparse_dit": 0.5}


class StageError(RuntimeError):
    """A stage failed; the message is what goes into the result files."""


# ------------------------------------------------------------------------------------------------
# results
class Results:
    """The run's results, rewritten atomically to OUT/retrieval.json and OUT/retrieval.md on every change."""

    def __init__(self, out: Path, settings: dict) -> None:
        self.out = out
        self.data: dict = {"settings": settings, "stages": {}, "training": {}, "retrieval": {}, "reconstruction": None}

    def write(self) -> None:
        _atomic_write(self.out / "retrieval.json", json.dumps(self.data, indent=1, default=_jsonable))
        _atomic_write(self.out / "retrieval.md", render_markdown(self.data))


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{digits}g}"
    return str(v)


def render_markdown(d: dict) -> str:
    s = d["settings"]
    lines = ["# Generation retrieval: a small real run", "",
             f"Command: `{s['command']}`  ", f"Device: {s['device']}; budget {s['budget_s']} s; {s['num_shapes']} shapes at "
             f"{s['resolution']}^3; models `{s['models']}`; condition encoder: random-weight DINOv2-with-registers "
             f"(`{s['dino']}`, seed {s['seed']}; no pretrained weights); sampling: index {s['dense_steps']} steps, "
             f"sparse {s['sparse_steps']} steps, shift {s['shift']}, guidance {s['guidance']}; view {s['view']} of each shape.", "",
             "## Stages", "", "| stage | status | seconds | notes |", "|---|---|---|---|"]
    for name, st in d["stages"].items():
        note = st.get("error") or ", ".join(f"{k} {_fmt(v)}" for k, v in st.items() if k not in ("status", "seconds", "error"))
        lines.append(f"| {name} | {st['status']} | {_fmt(st.get('seconds'), 3)} | {note.replace('|', '/')[:300]} |")
    if d["training"]:
        lines += ["", "## Training", "", "| stage | experiment | train time limit s | steps | first loss | last loss (mean of last 5 logs) |",
                  "|---|---|---|---|---|---|"]
        for name, t in d["training"].items():
            lines.append(f"| {name} | {t.get('experiment')} | {_fmt(t.get('max_time_s'))} | {_fmt(t.get('steps'))} | "
                         f"{_fmt(t.get('first_loss'))} | {_fmt(t.get('last_loss'))} |")
    for label, r in [*[(f"generated, guidance {g}", r) for g, r in d["retrieval"].items()],
                     ("VAE reconstruction of the reference latents", d["reconstruction"])]:
        if not r:
            continue
        lines += ["", f"## Retrieval: {label}", "", f"**top-1 {r['top1'] * 100:.1f}%** ({r['hits']}/{len(r['names'])}); "
                  "Chamfer-L1 (point samples, frame units of the [-1, 1] box)", "",
                  "| shape | own Chamfer | nearest reference | its Chamfer | rank of own | faces |", "|---|---|---|---|---|---|"]
        m = np.asarray(r["matrix"], float)
        for i, name in enumerate(r["names"]):
            j = r["nearest"][i]
            lines.append(f"| {name} | {_fmt(float(m[i, i]))} | {r['names'][j] if j >= 0 else '(no surface)'} | "
                         f"{_fmt(float(m[i, j])) if j >= 0 else '-'} | {r['rank'][i]} | {r['faces'][i]} |")
        lines += ["", "<details><summary>Chamfer matrix (rows: the meshes above, columns: the references)</summary>", "",
                  "| | " + " | ".join(str(j) for j in range(len(m))) + " |", "|---" * (len(m) + 1) + "|"]
        lines += [f"| {i} {r['names'][i]} | " + " | ".join(("**%.3f**" if i == j else "%.3f") % v for j, v in enumerate(row)) + " |"
                  for i, row in enumerate(m)]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# helpers
class Entry:
    """``python cmd...`` started in the repo root (its own process group), output to ``log``."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        print(f"    $ python {' '.join(cmd)}", flush=True)
        self.log, self.start = log, time.perf_counter()
        self._file = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=self._file, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait(self, timeout: float | None) -> float:
        """Wait for the end (killing the process group after ``timeout`` s); the seconds it ran. StageError
        with the log's tail on a non-zero exit or a timeout."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
            raise StageError(f"timed out after {time.perf_counter() - self.start:.0f} s (log {self.log})") from None
        finally:
            self._file.close()
        if rc != 0:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-15:]
            raise StageError(f"exit code {rc} (log {self.log}): " + " / ".join(tail))
        return time.perf_counter() - self.start


def run_entry(cmd: list[str], log: Path, timeout: float | None) -> None:
    """Run ``python cmd...`` to its end (see :class:`Entry`)."""
    Entry(cmd, log).wait(timeout)


def hms(seconds: float) -> str:
    """Seconds -> Lightning's max_time string DD:HH:MM:SS."""
    s = max(1, int(seconds))
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def training_log(run_dir: Path) -> dict:
    """{steps, first_loss, last_loss} from the CSV logs of a train.py run."""
    rows = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            rows += [r for r in csv.DictReader(f) if r.get("train/loss")]
    if not rows:
        return {}
    losses = [float(r["train/loss"]) for r in rows]
    return {"steps": max(int(r["step"]) for r in rows) + 1, "first_loss": losses[0], "last_loss": float(np.mean(losses[-5:]))}


def reference_data(data: Path, view: int) -> tuple[list[str], list[str], np.ndarray, list[np.ndarray], dict]:
    """(keys, names, reference points [S, N, 3], the chosen view (RGBA uint8) of each shape, latent-cell counts)
    in the order of gt_points.npz."""
    from d3ds2.data.shard_format import decode_sample
    from d3ds2.data.shards import read_tar

    gt = np.load(data / "gt_points.npz")
    keys, names = [str(k) for k in gt["keys"]], [str(n) for n in gt["names"]]
    views, cells = {}, {}
    for shard in sorted((data / "shards").glob("*.tar")):
        for raw in read_tar(str(shard)):
            s = decode_sample(raw)
            if s.get("views") is None or view >= len(s["views"]["rgba"]):
                raise StageError(f"{shard}: sample {s['key']} has no view {view}")
            views[s["key"]] = s["views"]["rgba"][view]
            cells[s["key"]] = {R: len(v["cells"]) for R, v in s["sdf"].items()}
    missing = [k for k in keys if k not in views]
    if missing:
        raise StageError(f"{data}/gt_points.npz names samples that are not in {data}/shards: {missing}")
    return keys, names, gt["points"], [views[k] for k in keys], cells


def score(meshes: list, names: list[str], ref_points: np.ndarray) -> tuple[dict, np.ndarray]:
    """Chamfer matrix of meshes (as many surface samples as the references hold) vs the reference point sets,
    the retrieval summary, and the samples [S, N, 3] (NaN for a mesh without faces, which scores +inf against
    every reference)."""
    from d3ds2.eval.retrieval import chamfer_matrix, retrieval, surface_points

    preds = [surface_points(m, ref_points.shape[1], seed=i) for i, m in enumerate(meshes)]
    m = chamfer_matrix(preds, list(ref_points))
    r = retrieval(m)
    points = np.stack([np.full(ref_points.shape[1:], np.nan, np.float32) if p is None else p for p in preds])
    return {"top1": r["top1"], "hits": int(sum(x == 0 for x in r["rank"])), "names": names, "nearest": r["nearest"],
            "rank": r["rank"], "faces": [0 if mm is None else len(mm.faces) for mm in meshes], "matrix": m.tolist()}, points


def save_meshes(meshes: list, names: list[str], folder: Path) -> None:
    """Write each mesh with faces as binary PLY (``NN_name.ply``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (m, name) in enumerate(zip(meshes, names)):
        if m is not None and len(m.faces):
            m.export(folder / f"{i:02d}_{name}.ply")


# ------------------------------------------------------------------------------------------------
# prepare (CPU)
def prepare(args) -> None:
    """Corpus -> data_prep shards -> gt_points.npz under --data (see the module docstring)."""
    import trimesh  # noqa: F401  (fail early when the data extras are missing)

    from d3ds2.data.shard_format import decode_sample
    from d3ds2.data.shards import read_tar
    from d3ds2.eval.retrieval import surface_points
    from d3ds2.geometry.mesh_io import load_mesh
    from d3ds2.geometry.normalize import clean_mesh, normalise_mesh
    from d3ds2.geometry.watertight import reference_surface

    data = Path(args.data).resolve()
    if data.exists() and any(data.iterdir()):
        raise SystemExit(f"prepare: {data} is not empty; remove it or choose another --data")
    meshes = data / "meshes"
    t0 = time.perf_counter()
    run_entry(["-m", "data_prep.corpus", f"out={meshes}", f"n_procedural={args.n_procedural}", f"seed={args.seed}"],
              data / "logs" / "corpus.log", None)
    run_entry(["-m", "data_prep", f"input={meshes}", f"output={data}", f"resolutions=[{args.resolution}]",
               f"views={args.views}", f"render.size={args.render_size}", "samples_per_shard=1000", "val_fraction=0",
               f"workers={args.workers}", "progress=false"], data / "logs" / "data_prep.log", None)
    keys, names, points = [], [], []
    for shard in sorted((data / "shards").glob("*.tar")):
        for raw in read_tar(str(shard)):
            s = decode_sample(raw, resolutions=[], with_views=False)
            src, norm = s["meta"]["source"], s["meta"]["normalisation"]
            mesh, got = normalise_mesh(clean_mesh(load_mesh(src)), norm["extent"])
            if not (np.allclose(got.center, norm["center"]) and np.isclose(got.scale, norm["scale"])):
                raise SystemExit(f"prepare: normalisation of {src} differs from the one data_prep stored")
            keys.append(s["key"])
            names.append(Path(src).stem)
            points.append(surface_points(reference_surface(mesh), args.points, seed=len(points)))
    order = np.argsort(names)
    tmp = data / "gt_points.tmp.npz"
    np.savez_compressed(tmp, keys=np.array(keys)[order], names=np.array(names)[order], points=np.stack(points)[order])
    os.replace(tmp, data / "gt_points.npz")
    shutil.rmtree(data / "samples")
    shutil.rmtree(meshes)
    size = sum(p.stat().st_size for p in data.rglob("*") if p.is_file()) / 2**20
    print(f"prepared {len(keys)} shapes under {data} ({size:.1f} MiB) in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(np.array(names)[order]))


# ------------------------------------------------------------------------------------------------
# run (GPU)
class RetrievalRun:
    def __init__(self, args) -> None:
        import torch

        self.args = args
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.budget_s
        self.out = Path(args.out).resolve()
        self.work = Path(args.work or tempfile.mkdtemp(prefix="generation_retrieval_")).resolve()
        if self.work == self.out or self.out in self.work.parents:
            raise SystemExit("run: --work must lie outside --out (--out only receives the four result files)")
        if (self.work / "logs").exists():
            raise SystemExit(f"run: {self.work} already holds a run (logs/); choose a new --work")
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.data, self.vae = Path(args.data).resolve(), Path(args.vae).resolve()
        self.device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.latents = self.work / "data" / "latents" / str(args.resolution)
        self.dino_dir = self.work / "dinov2_random"
        self.exps = EXPERIMENTS[args.models]
        self.overhead = 25.0 if self.device.startswith("cuda") else 30.0  # process start-up + teardown per train.py run
        # DataLoader workers hand batches (condition tokens: ~70 MB) over in /dev/shm: none when it is small
        shm = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
        self.loader_workers = None if shm >= 4 * 2**30 and self.device.startswith("cuda") else 0
        device_name = torch.cuda.get_device_name(0) if self.device.startswith("cuda") else "cpu"
        gt = np.load(self.data / "gt_points.npz")
        self.results = Results(self.out, {
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "device": device_name,
            "budget_s": args.budget_s, "resolution": args.resolution, "models": args.models, "dino": args.dino,
            "seed": args.seed, "dense_steps": args.dense_steps, "sparse_steps": args.sparse_steps, "shift": args.shift,
            "guidance": args.guidance, "view": args.view, "num_shapes": len(gt["keys"]), "vae": str(self.vae),
            "index_threshold": args.index_threshold, "work": str(self.work),
            "loader_workers": "experiment default" if self.loader_workers is None else self.loader_workers,
            "dev_shm_free_gib": shm / 2**30})
        self.failed: set[str] = set()
        self.points: dict[str, np.ndarray] = {}

    # --------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def stage(self, name: str, fn, needs: tuple[str, ...] = ()) -> None:
        """Run one stage: time it, record ok/failed/skipped in the results, never raise."""
        st = self.results.data["stages"]
        if any(n in self.failed for n in needs):
            self.failed.add(name)
            st[name] = {"status": "skipped", "error": "needs " + ", ".join(n for n in needs if n in self.failed)}
            print(f"=== {name}: skipped ({st[name]['error']})", flush=True)
            self.results.write()
            return
        print(f"=== {name} ({self.left():.0f} s of the budget left)", flush=True)
        start = time.perf_counter()
        try:
            info = fn() or {}
            st[name] = {"status": "ok", "seconds": info.pop("seconds", time.perf_counter() - start), **info}
        except Exception as e:  # a failed stage is reported in the result files, the run goes on where it can
            self.failed.add(name)
            msg = str(e) if isinstance(e, StageError) else f"{type(e).__name__}: {e} | {' / '.join(traceback.format_exc().strip().splitlines()[-4:])}"
            st[name] = {"status": "failed", "seconds": time.perf_counter() - start, "error": msg}
        notes = st[name].get("error") or ", ".join(f"{k} {_fmt(v)}" for k, v in st[name].items() if k not in ("status", "seconds"))
        print(f"=== {name}: {st[name]['status']} in {st[name]['seconds']:.1f} s" + (f": {notes}" if notes else ""), flush=True)
        self.results.write()
        self.bundle()

    def bundle(self) -> None:
        """logs.tar.gz (stage logs, training CSVs and configs) and points.npz (scored surface samples) in --out."""
        logs = sorted((self.work / "stage_logs").glob("*.log"))
        logs += sorted(self.work.glob("logs/*/*/csv/version_*/metrics.csv")) + sorted(self.work.glob("logs/*/*/config_resolved.yaml"))
        if logs:
            tmp = self.out / f"logs.tmp{os.getpid()}.tar.gz"
            with tarfile.open(tmp, "w:gz") as tar:
                for f in logs:
                    tar.add(f, arcname=str(f.relative_to(self.work)))
            os.replace(tmp, self.out / "logs.tar.gz")
        if self.points:
            tmp = self.out / f"points.tmp{os.getpid()}.npz"
            np.savez_compressed(tmp, names=np.array(self.results.data["retrieval_names"]),
                                **{k: v.astype(np.float16) for k, v in self.points.items()})
            os.replace(tmp, self.out / "points.npz")

    # --------------------------------------------------------------------------------------------
    def dino(self) -> dict:
        """A random-weight DINOv2-with-registers, seeded, saved so every later stage loads the same one."""
        from d3ds2.models.conditioner import ImageConditioner

        enc = ImageConditioner(config=DINO_CONFIGS[self.args.dino], seed=self.args.seed)
        enc.backbone.save_pretrained(self.dino_dir)
        return {"hidden_size": enc.channels, "tokens": enc.num_tokens,
                "params_M": sum(p.numel() for p in enc.parameters()) / 1e6}

    def encode(self) -> dict:
        run_entry(["-m", "data_prep.encode_latents", f"data={self.data}", f"resolution={self.args.resolution}",
                   f"vae={self.vae}", f"out={self.latents}", "features=precompute", f"backbone={self.dino_dir}", f"device={self.device}",
                   "stats=false", "progress=false"], self.work / "stage_logs" / "encode.log", max(self.left(), 1))
        from d3ds2.data.latent_shards import read_latent_shard

        tokens = [len(s["coords"]) for p in sorted(self.latents.glob("*.tar")) for s in read_latent_shard(p)]
        return {"samples": len(tokens), "latent_tokens_mean": float(np.mean(tokens)), "latent_tokens_max": int(max(tokens))}

    def stats(self) -> dict:
        run_entry(["-m", "data_prep.latent_stats", f"shards={self.latents}", f"out={self.latents / 'stats.json'}"],
                  self.work / "stage_logs" / "stats.log", max(self.left(), 1))
        s = json.loads((self.latents / "stats.json").read_text())
        return {"mean_abs_mean": float(np.abs(s["mean"]).mean()), "std_mean": float(np.mean(s["std"]))}

    def _model_overrides(self, stage: str) -> list[str]:
        from omegaconf import OmegaConf

        grid = self.args.resolution // 8
        cond = json.loads((self.dino_dir / "config.json").read_text())["hidden_size"]
        if stage == "index_vae":
            return [f"model.resolution={grid}"]
        if stage == "index_dit":
            return [f"model.resolution={grid}", f"model.net.resolution={grid // 4}", f"model.net.cond_channels={cond}",
                    f"vae_from={self.work / 'logs' / self.exps['index_vae'] / RUN_NAME}", "model.conditioner=null"]
        latent = OmegaConf.load(self.vae / "config_resolved.yaml").model.net.latent_channels
        return [f"model.net.in_channels={latent}", f"model.net.cond_channels={cond}", "model.conditioner=null",
                f"model.latent_stats={self.latents / 'stats.json'}", f"vae_from={self.vae}"]

    def launch(self, stage: str, wall: float) -> dict:
        """Start train.py on this stage's experiment, time-boxed to end ``wall`` s from now (its start-up
        included); returns the job for :meth:`finish`."""
        max_time = wall - self.overhead
        if max_time < 5:
            raise StageError(f"no time left to train ({wall:.0f} s for the stage, {self.overhead:.0f} s start-up): raise --budget-s")
        exp = self.exps[stage]
        cmd = ["train.py", f"experiment={exp}", f"paths.root_dir={self.work}", f"run_name={RUN_NAME}", "logger=csv",
               "callbacks.progress_bar.refresh_rate=0", f"seed={self.args.seed}",
               f"data.train_shards={self.latents / '*.tar'}", "data.cache=true", f"trainer.max_steps={self.args.max_steps}",
               f"+trainer.max_time='{hms(max_time)}'", *self._model_overrides(stage)]
        if not self.device.startswith("cuda"):
            cmd += ["trainer.accelerator=cpu", "trainer.precision=32"]
        if self.loader_workers is not None:
            cmd += [f"data.num_workers={self.loader_workers}"]
        cmd += self.args.train_args.get(stage, [])
        self.results.data["training"][stage] = {"experiment": exp, "max_time_s": int(max_time)}
        return {"stage": stage, "entry": Entry(cmd, self.work / "stage_logs" / f"{stage}.log"), "wall": wall,
                "max_time": int(max_time), "run_dir": self.work / "logs" / exp / RUN_NAME}

    def finish(self, job: dict) -> dict:
        """Wait for a launched training run (killed 60 s past its time box), read its checkpoint and losses."""
        entry = job["entry"]
        took = entry.wait(max(1.0, min(job["wall"] + 60 - (time.perf_counter() - entry.start), self.left())))
        if not (job["run_dir"] / "checkpoints" / "last.ckpt").is_file():
            raise StageError(f"{job['run_dir']}/checkpoints/last.ckpt was not written")
        log = training_log(job["run_dir"])
        self.results.data["training"][job["stage"]].update({**log, "wall_s": took})
        if took > job["max_time"]:
            self.overhead = max(5.0, took - job["max_time"])
        return {"seconds": took, "steps": log.get("steps"), "last_loss": log.get("last_loss")}

    def train_all(self) -> None:
        """The three training stages in the window left after the fixed stages minus --reserve-s. In parallel
        (default; small models leave most of the GPU idle): the SS-DiT for the whole window, beside the index
        VAE (0.35 of it) then the index DiT (the rest). --sequential: one after the other, 0.2 / 0.3 / 0.5."""
        window_end = time.perf_counter() + self.left() - self.args.reserve_s
        if self.args.sequential:
            for name, needs in (("index_vae", ("encode",)), ("index_dit", ("index_vae",)), ("sparse_dit", ("stats",))):
                rest = [s for s in TRAIN_SHARE if s not in self.results.data["stages"]]
                share = TRAIN_SHARE[name] / sum(TRAIN_SHARE[s] for s in rest)
                self.stage(name, lambda n=name, f=share: self.finish(self.launch(n, (window_end - time.perf_counter()) * f)), needs)
            return
        sparse: dict | Exception = StageError("needs stats")
        if "stats" not in self.failed:
            try:
                sparse = self.launch("sparse_dit", window_end - time.perf_counter())
            except Exception as e:  # reported by the sparse_dit stage below
                sparse = e
        self.stage("index_vae", lambda: self.finish(self.launch("index_vae", 0.35 * (window_end - time.perf_counter()))), ("encode",))
        self.stage("index_dit", lambda: self.finish(self.launch("index_dit", window_end - time.perf_counter())), ("index_vae",))

        def finish_sparse() -> dict:
            if isinstance(sparse, Exception):
                raise sparse
            return self.finish(sparse)

        self.stage("sparse_dit", finish_sparse)

    # --------------------------------------------------------------------------------------------
    def _pipeline(self):
        from d3ds2.pipeline import ImageTo3DPipeline

        return ImageTo3DPipeline.from_runs(
            str(self.work / "logs" / self.exps["index_dit"] / RUN_NAME), str(self.work / "logs" / self.exps["sparse_dit"] / RUN_NAME),
            str(self.vae), backbone=str(self.dino_dir), device=self.device, index_threshold=self.args.index_threshold,
            mesh_workers=self.args.mesh_workers)

    def generate(self, guidances: list[float], optional: bool = False) -> dict:
        """Every shape from its view ``--view``, batches of --gen-batch, for each guidance value (``optional``:
        only while --min-extra-s of the budget is left); each is scored at once, so a timeout keeps the
        finished ones."""
        import torch

        from d3ds2.pipeline import StageSampling

        keys, names, ref_points, views, cells = reference_data(self.data, self.args.view)
        self.results.data["retrieval_names"] = names
        pipe = self._pipeline()
        info: dict = {}
        b = self.args.gen_batch
        for g in guidances:
            if optional and self.left() < self.args.min_extra_s:
                info[f"guidance {g:g}"] = "skipped: budget"
                continue
            start, meshes, times, peak, gen_cells = time.perf_counter(), [], {}, 0.0, []
            dense = StageSampling(self.args.dense_steps, self.args.shift, g)
            sparse = StageSampling(self.args.sparse_steps, self.args.shift, g)
            # the pipeline's first sparse stage is named 512; its resolution comes from the index grid (here --resolution)
            log = self.work / "stage_logs" / f"generate_g{g:g}.log"
            with open(log, "w") as f, contextlib.redirect_stderr(f), torch.no_grad():  # progress bars to the log
                for c in range(0, len(views), b):
                    meshes += pipe(views[c : c + b], resolution=512, seed=self.args.seed + c, dense=dense, sparse_512=sparse)
                    for r in pipe.reports:
                        times[r.name] = times.get(r.name, 0.0) + r.seconds
                        peak = max(peak, r.peak_gib or 0.0)
                        if r.name == "index DiT":
                            gen_cells.append(r.info["cells"])
            seconds = time.perf_counter() - start
            save_meshes(meshes, names, self.work / "meshes" / f"generated_g{g:g}")
            result, self.points[f"generated_g{g:g}"] = score(meshes, names, ref_points)
            result.update({"seconds_generate": seconds, "seconds_score": time.perf_counter() - start - seconds,
                           "stage_seconds": times, "peak_gib": peak, "generated_cells_per_batch": gen_cells})
            result["reference_cells"] = [cells[k].get(self.args.resolution) for k in keys]
            self.results.data["retrieval"][f"{g:g}"] = result
            self.results.write()
            self.bundle()
            info[f"top1@guidance{g:g}"] = result["top1"]
            print(f"    guidance {g}: top-1 {result['top1'] * 100:.1f}% ({result['hits']}/{len(names)}), "
                  f"{seconds:.1f} s generation, {result['seconds_score']:.1f} s scoring", flush=True)
        return info

    def reconstruct(self) -> dict:
        """Decode the reference latents with the VAE, mesh, score: what the generation could reach at best."""
        import torch

        from d3ds2.pipeline import extract_meshes, load_model, resolve_run
        from d3ds2.sparse import SparseTensor
        from d3ds2.data.latent_shards import read_latent_shard

        keys, names, ref_points, _, _ = reference_data(self.data, self.args.view)
        self.results.data["retrieval_names"] = names
        lat = {s["key"]: s for p in sorted(self.latents.glob("*.tar")) for s in read_latent_shard(p)}
        cfg, ckpt = resolve_run(self.vae)
        vae = load_model(cfg.model.net, ckpt).to(self.device)
        cuda = self.device.startswith("cuda")
        meshes = []
        for c in range(0, len(keys), self.args.gen_batch):
            chunk = [lat[k] for k in keys[c : c + self.args.gen_batch]]
            z = SparseTensor.from_samples([torch.from_numpy(s["feats"].astype(np.float32)) for s in chunk],
                                          [torch.from_numpy(s["coords"].astype(np.int32)) for s in chunk]).to(self.device)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                sdf = vae.decode(z).sdf
            meshes += extract_meshes(sdf, self.args.resolution, 0.0, self.args.mesh_workers)
        save_meshes(meshes, names, self.work / "meshes" / "reconstructed")
        result, self.points["reconstructed"] = score(meshes, names, ref_points)
        self.results.data["reconstruction"] = result
        return {"top1": result["top1"], "own_chamfer_mean": float(np.mean(np.diag(np.asarray(result["matrix"]))))}

    # --------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.results.write()
        self.stage("dino", self.dino)
        self.stage("encode", self.encode, ("dino",))
        self.stage("stats", self.stats, ("encode",))
        self.train_all()
        self.stage("generate", lambda: self.generate(self.args.guidance[:1]), ("index_dit", "sparse_dit"))
        if not self.args.skip_reconstruct:
            self.stage("reconstruct", self.reconstruct, ("encode",))
        if len(self.args.guidance) > 1:
            self.stage("generate_more", lambda: self.generate(self.args.guidance[1:], optional=True), ("generate",))
        total = time.perf_counter() - self.t0
        self.results.data["total_seconds"] = total
        self.results.write()
        best = {g: r["top1"] for g, r in self.results.data["retrieval"].items()}
        print(f"done in {total:.0f} s (budget {self.args.budget_s:.0f} s); top-1 by guidance: {best}; "
              f"results: {self.out / 'retrieval.md'}", flush=True)


# ------------------------------------------------------------------------------------------------
def parse_train_args(items: list[str]) -> dict[str, list[str]]:
    """['index_dit:model.optimizer.lr=1e-4', ...] -> {'index_dit': [...]}"""
    out: dict[str, list[str]] = {}
    for it in items:
        stage, sep, override = it.partition(":")
        if not sep or stage not in TRAIN_SHARE:
            raise SystemExit(f"--train-arg {it!r}: expected STAGE:key=value with STAGE in {sorted(TRAIN_SHARE)}")
        out.setdefault(stage, []).append(override)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="corpus + data_prep + reference point samples (CPU)")
    p.add_argument("--data", required=True, help="output folder (must be empty or absent)")
    p.add_argument("--n-procedural", type=int, default=11, help="CSG shapes beside the 5 real meshes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--render-size", type=int, default=518)
    p.add_argument("--points", type=int, default=10000, help="surface samples per reference shape")
    p.add_argument("--workers", type=int, default=2)

    r = sub.add_parser("run", help="encode, train, generate, score (GPU)")
    r.add_argument("--vae", required=True, help="training run directory of the sparse SDF VAE (config_resolved.yaml + checkpoints/last.ckpt)")
    r.add_argument("--data", required=True, help="folder written by `prepare`")
    r.add_argument("--out", required=True, help="folder of the four result files")
    r.add_argument("--work", default=None, help="folder of everything else (new; default: a fresh temporary folder)")
    r.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of all stages together")
    r.add_argument("--reserve-s", type=float, default=90.0,
                   help="part of the budget kept for generation, scoring and the reconstruction")
    r.add_argument("--min-extra-s", type=float, default=45.0, help="budget left needed to run each extra --guidance")
    r.add_argument("--resolution", type=int, default=256, help="fine SDF resolution of the latents (VAE's)")
    r.add_argument("--models", choices=sorted(EXPERIMENTS), default="small", help="experiment set (tiny: CPU tests)")
    r.add_argument("--dino", choices=sorted(DINO_CONFIGS), default="large", help="random DINOv2 architecture")
    r.add_argument("--sequential", action="store_true", help="train the three models one after the other, not in parallel")
    r.add_argument("--max-steps", type=int, default=1000000, help="step cap per training stage (time is the usual limit)")
    r.add_argument("--train-arg", action="append", default=[], help="extra override STAGE:key=value (repeatable)")
    r.add_argument("--view", type=int, default=0, help="which training view conditions the generation")
    r.add_argument("--dense-steps", type=int, default=50)
    r.add_argument("--sparse-steps", type=int, default=30)
    r.add_argument("--shift", type=float, default=6.0)
    r.add_argument("--guidance", type=float, nargs="+", default=[3.0, 7.0],
                   help="CFG scales; the first is the headline, the others run while the budget allows")
    r.add_argument("--index-threshold", type=float, default=0.1)
    r.add_argument("--gen-batch", type=int, default=4, help="shapes per pipeline call (and VAE decode)")
    r.add_argument("--mesh-workers", type=int, default=4, help="processes extracting the meshes of a batch")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto")
    r.add_argument("--skip-reconstruct", action="store_true")
    args = ap.parse_args()
    if args.command == "prepare":
        prepare(args)
    else:
        args.train_args = parse_train_args(args.train_arg)
        RetrievalRun(args).run()


if __name__ == "__main__":
    main()
