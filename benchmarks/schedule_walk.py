"""Walk the whole training schedule, resumably: corpus -> data prep (train / held-out split) -> VAE
(multi-resolution) -> VAE F-score on held-out meshes -> latents -> index VAE -> index DiT -> SS-DiT at the low then
the high resolution -> inference on held-in and held-out renders -> evaluate.py.

    python benchmarks/schedule_walk.py work=/tmp/walk size=small budget_s=540 device=cuda out=$OUT/walk.json

Keys (key=value): ``work`` (everything goes there; the only path to type), ``size`` (tiny | small | full, see
SIZES), ``budget_s`` (seconds this call may use; default: no limit), ``device`` (cuda | cpu), ``out`` (a
copy of the record, rewritten after every stage), ``meshes`` (a folder of meshes to use instead of the
corpus stage), ``until`` (stop after this stage), and any key of the size (``vae_steps=2000``).

Every stage is a real entry point (``data_prep``, ``train.py``, ``data_prep.encode_latents``,
``inference.py``, ``evaluate.py``, ``benchmarks/vae_recon_eval.py``) run as a subprocess; the command,
seconds and metrics of each go to ``<work>/walk.json``. Calling the script again with the same ``work``
skips the finished stages; a training stage that ran out of the call's time stops cleanly (``pause_after``:
``last.ckpt`` written) and the next call continues it from there (``run_name=walk ckpt_path=last``); a
stage is finished when its run wrote ``finished.json``. The stages find the runs they build on by task name
(chain.init / chain.vae / vae_from), so no run path is typed.

Sizes: ``tiny`` runs on a CPU (about 14 minutes on 2 busy cores; tiny models seeing seconds of training, so
its meshes come out empty: it proves the chain, not quality; data at 32^3 and 64^3, the VAE trained at 32^3 and
encoding both, the SS-DiT at 32 then 64, the index stage at 64); ``small`` is for one H100/H200 in
10-minute calls: the full v1.1-size VAE (37.9M parameters) at 256/384/512, but the small index VAE / index
DiT / SS-DiT (index_vae_small, index_dit_small, dit_small: full-size ones cannot learn anything in minutes)
and a random-weight DINOv2-L (no download on the GPU machine; seeded, so training and inference see the
same encoder); ``full`` uses the paper-size configs throughout (days on 8 GPUs; for a cluster).
One data folder, ``<work>/data`` (layout: d3ds2/data/layout.py), holds both splits: the held-out meshes are
data prep's val split. Data prep's own rule (``val_fraction`` = ``heldout_percent`` / 100, hashed from the file
name) picks them; when it picks fewer than 2, the first meshes are added. The corpus stage writes the outcome
to ``<work>/split.txt`` and data prep reads it (``split_file``), so the record, the shards and the evaluation
agree. The training stages read folders: ``data.*_shards=<work>/data/shards`` (its train-/val-*.tar) and
``<work>/data/latents/R`` for the latent stages.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's d3ds2, whatever is installed
from d3ds2.data.layout import SPLITS, DataLayout, shard_urls  # noqa: E402
RUN = "walk"
TINY_DINO = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "image_size": 518, "patch_size": 14, "num_register_tokens": 4}
LARGE_DINO = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4, "image_size": 518,
              "patch_size": 14, "num_register_tokens": 4, "layerscale_value": 1.0}

SIZES = {
    "tiny": dict(n_procedural=5, real="pymeshfix", views=2, render_size=128, watertight=64, prep_res=[32, 64],
                 vae_exp="vae_tiny", vae_res=[32], vae_steps=40, vae_batch_voxels=0, dit_res=[32, 64], index_res=64,
                 index_vae_exp="index_vae_tiny", index_dit_exp="index_dit_tiny", dit_exp="dit_tiny", dino=TINY_DINO,
                 index_vae_steps=40, index_dit_steps=30, dit_steps=[30, 20], val_every=30, picture_steps=4,
                 sample_steps=5, heldout_percent=30, workers=2),
    "small": dict(n_procedural=40, real="pyvista,pymeshfix", views=8, render_size=518, watertight=256,
                  prep_res=[256, 512], vae_exp="vae_multires", vae_res=[256, 384, 512], vae_steps=3000, vae_batch_voxels=0,
                  dit_res=[256, 512], index_res=512, index_vae_exp="index_vae_small", index_dit_exp="index_dit_small",
                  dit_exp="dit_256_small", dino=LARGE_DINO, index_vae_steps=1500, index_dit_steps=1500,
                  dit_steps=[2000, 1000], val_every=500, picture_steps=25, sample_steps=30, heldout_percent=20,
                  workers=8),
    "full": dict(n_procedural=200, real="pyvista,pymeshfix", views=45, render_size=1024, watertight=512,
                 prep_res=[256, 512], vae_exp="vae_multires", vae_res=[256, 384, 512], vae_steps=200000, vae_batch_voxels=0,
                 dit_res=[256, 512], index_res=512, index_vae_exp="index_vae", index_dit_exp="index_dit",
                 dit_exp="dit_256", dino=LARGE_DINO, index_vae_steps=100000, index_dit_steps=200000,
                 dit_steps=[200000, 200000], val_every=2000, picture_steps=25, sample_steps=30, heldout_percent=10,
                 workers=16),
}
MARGIN_S = 75  # a training stage pauses this long before the budget ends (start-up, checkpoint, exit)


class OutOfTime(Exception):
    """This call's budget is spent: the walk continues on the next call."""


def last_metrics(run: Path) -> dict:
    """Last value of every logged metric of a training run (from its CSV logs), plus the step."""
    from d3ds2.training.plots import read_metrics

    out: dict = {}
    for csv_path in sorted(run.glob("csv/version_*/metrics.csv")):
        for name, (steps, values) in read_metrics(csv_path).items():
            if name.startswith(("train/loss", "val/")) or name in ("train/mse",):
                out[name] = round(values[-1], 5)
    marker = run / "finished.json"
    if marker.is_file():
        out["step"] = json.loads(marker.read_text())["global_step"]
    return out


class Walk:
    def __init__(self, opts: dict) -> None:
        self.work = Path(opts.pop("work")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.record_path = self.work / "walk.json"
        self.record = json.loads(self.record_path.read_text()) if self.record_path.is_file() else {"stages": {}}
        size = opts.pop("size", self.record.get("size", "tiny"))
        self.s = dict(SIZES[size])
        for k in list(opts):
            if k in self.s:
                self.s[k] = type(self.s[k])(json.loads(opts.pop(k))) if isinstance(self.s[k], list) else type(self.s[k])(opts.pop(k))
        self.device = opts.pop("device", "cuda" if _cuda() else "cpu")
        budget = float(opts.pop("budget_s", "inf"))
        self.deadline = time.monotonic() + budget
        self.out = Path(opts.pop("out")) if "out" in opts else None
        self.meshes = Path(opts.pop("meshes")).resolve() if "meshes" in opts else None
        self.until = opts.pop("until", None)
        self.margin_s = float(opts.pop("margin_s", MARGIN_S))
        if opts:
            raise SystemExit(f"schedule_walk: unknown keys {sorted(opts)}; see the docstring")
        self.record.update(size=size, settings=self.s, device=self.device)
        self.record.setdefault("calls", 0)
        self.record["calls"] += 1
        self.logs = self.work / "stage_logs"
        self.logs.mkdir(exist_ok=True)

    # ------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        text = json.dumps(self.record, indent=2)
        for path in [self.record_path, *([self.out] if self.out else [])]:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)

    def run(self, name: str, cmd: list[str], timeout: float | None = None) -> str:
        """Run one entry point (python cmd...) in the repository root, output to stage_logs/<name>.log."""
        timeout = self.left() if timeout is None else timeout
        if timeout <= 5:
            raise OutOfTime(name)
        timeout = None if timeout == float("inf") else timeout
        entry = self.record["stages"].setdefault(name, {})
        entry.setdefault("commands", [])
        line = " ".join([Path(sys.executable).name, *cmd])
        if line not in entry["commands"]:
            entry["commands"].append(line)
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TQDM_DISABLE": "1"}
        with open(self.logs / f"{name}.log", "a") as log:
            log.write(f"\n$ {line}\n")
            log.flush()
            try:
                done = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=log, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise OutOfTime(name) from None
            log.write(done.stdout)
        if done.returncode:
            raise RuntimeError(f"{name}: exit {done.returncode}; see {self.logs / (name + '.log')}")
        return done.stdout

    def stage(self, name: str, fn) -> None:
        entry = self.record["stages"].setdefault(name, {})
        if entry.get("status") == "done":
            return
        start = time.monotonic()
        entry["status"] = "running"
        try:
            metrics = fn()
        except OutOfTime:
            entry["status"] = "unfinished"
            raise
        except Exception as e:
            entry.update(status="failed", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            entry["seconds"] = round(entry.get("seconds", 0.0) + time.monotonic() - start, 1)
            self.save()
        entry.update(status="done", metrics=metrics or {})
        self.save()
        print(f"[walk] {name}: done in {entry['seconds']} s {json.dumps(metrics or {})}", flush=True)
        if name == self.until:
            raise OutOfTime(name)

    # ------------------------------------------------------------------------------------------
    # stages
    @property
    def mesh_dir(self) -> Path:
        return self.work / "meshes"

    @property
    def data(self) -> DataLayout:
        return DataLayout(str(self.work / "data"))

    @property
    def val_fraction(self) -> float:
        return self.s["heldout_percent"] / 100

    def corpus(self) -> dict:
        """The meshes, and their split pinned in split.txt (data prep's hashed rule, at least 2 held out)."""
        from d3ds2.data.mesh_sample import sample_key
        from d3ds2.data.splits import assign_split

        out = self.mesh_dir
        if self.meshes is not None:
            shutil.copytree(self.meshes, out, dirs_exist_ok=True)
        else:
            self.run("corpus", ["-m", "data_prep.corpus", f"out={out}", f"n_procedural={self.s['n_procedural']}",
                                f"real=[{self.s['real']}]"])
        files = sorted(p for p in out.iterdir() if p.is_file())
        held = [p for p in files if assign_split(str(p), sample_key(str(p)), str(out), self.val_fraction) == "val"]
        held += [p for p in files if p not in held][:max(0, 2 - len(held))]
        (self.work / "split.txt").write_text("".join(f"{'val' if p in held else 'train'} {p.name}\n" for p in files))
        return {"meshes": len(files), "heldout": len(held)}

    def prep(self) -> dict:
        res = ",".join(map(str, self.s["prep_res"]))
        out = self.run("prep", ["-m", "data_prep", f"input={self.mesh_dir}", f"output={self.data.root}",
                                f"val_fraction={self.val_fraction}", f"split_file={self.work / 'split.txt'}",
                                f"resolutions=[{res}]", f"views={self.s['views']}", f"render.size={self.s['render_size']}",
                                f"watertight.resolution={self.s['watertight']}", "samples_per_shard=2",
                                f"workers={self.s['workers']}", "progress=false"])
        summary = json.loads(out[out.index("{"):])
        return {k: summary[k] for k in ("ok", "inputs", "splits", "shards") if k in summary}

    def loader_workers(self) -> int:
        """Loader processes: each needs a shard of its own in both splits (2 meshes per shard)."""
        shards = min(len(shard_urls(self.data.shards_dir, split)) for split in SPLITS)
        return max(0, min(1 if self.device == "cpu" else 4, shards))

    def common(self, task_exp: str, steps: int) -> list[str]:
        """train.py arguments shared by the training stages."""
        cmd = ["train.py", f"experiment={task_exp}", f"paths.root_dir={self.work}", f"run_name={RUN}",
               "ckpt_path=last", "logger=many", "callbacks.progress_bar.refresh_rate=0", f"trainer.max_steps={steps}",
               f"trainer.val_check_interval={self.s['val_every']}", "trainer.limit_val_batches=2",
               f"callbacks.model_checkpoint.every_n_train_steps={self.s['val_every']}",
               *([f"pause_after={max(10, int(self.left() - self.margin_s))}"] if self.left() < float("inf") else [])]
        if self.device == "cpu":
            cmd += ["trainer.accelerator=cpu", "trainer.precision=32"]
        else:
            cmd += ["trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=bf16-mixed"]
        return cmd

    def train(self, name: str, task: str, cmd: list[str]) -> dict:
        """A training stage: runs until finished.json exists; an interrupted call is continued next time."""
        if self.left() < self.margin_s + 10:
            raise OutOfTime(name)
        self.run(name, cmd, timeout=self.left())
        run = self.work / "logs" / task / RUN
        if not (run / "finished.json").is_file():
            raise OutOfTime(name)  # paused: the next call resumes from last.ckpt
        return last_metrics(run)

    def vae(self) -> dict:
        s = self.s
        cmd = self.common(s["vae_exp"], s["vae_steps"]) + [
            f"data.train_shards={self.data.shards_dir}", f"data.val_shards={self.data.shards_dir}",
            f"data.resolutions=[{','.join(map(str, s['vae_res']))}]", f"data.val_resolution={s['vae_res'][0]}",
            f"data.num_workers={self.loader_workers()}", "model.val_meshes=2",
            "model.render_meshes=2", *([f"data.batch_voxels={s['vae_batch_voxels']}"] if s["vae_batch_voxels"] else [])]
        return self.train("vae", s["vae_exp"], cmd)

    @property
    def vae_run(self) -> Path:
        return self.work / "logs" / self.s["vae_exp"] / RUN

    def vae_eval(self) -> dict:
        """F-score@0.01 (and Chamfer) of the VAE's reconstructions of the held-out meshes at each resolution."""
        out = {}
        for R in sorted({self.s["vae_res"][0], self.s["vae_res"][-1]}):
            recon = self.work / "vae_eval" / f"recon_{R}.npz"
            recon.parent.mkdir(exist_ok=True)
            self.run("vae_eval", ["benchmarks/vae_recon_eval.py", "--ckpt", str(self.vae_run / "checkpoints" / "last.ckpt"),
                                  "--shards", self.data.shards_dir, "--split", "val", "--resolution", str(R),
                                  "--out", str(recon)])
            lines = self.run("vae_eval", ["benchmarks/vae_recon_eval.py", "--recon", str(recon), "--meshes",
                                          str(self.mesh_dir)]).strip().splitlines()
            rows = [json.loads(x) for x in lines if x.startswith("{")]
            per_mesh = [r["fscore@0.01"] for r in rows if "key" in r]
            out[str(R)] = {"fscore@0.01_mean": round(float(sum(per_mesh) / len(per_mesh)), 4),
                           "fscore@0.01_min": round(min(per_mesh), 4), "meshes": len(per_mesh),
                           "chamfer_l1_mean": rows[-1]["mean"].get("chamfer_l1")}
        return out

    def latents(self) -> dict:
        """Both splits encoded by the VAE into data/latents/R with the train split's stats.json (resumable: a
        shard already encoded is skipped)."""
        out = {}
        for R in sorted({*self.s["dit_res"], self.s["index_res"]}):
            self.run("latents", ["-m", "data_prep.encode_latents", f"data={self.data.root}", f"resolution={R}",
                                 f"vae={self.vae_run}", "features=images", f"device={self.device}", "progress=false"])
            out[str(R)] = {split: len(shard_urls(self.data.latents_dir(R), split)) for split in SPLITS}
        return {"shards_per_resolution": out}

    def latent_data(self, R: int) -> list[str]:
        """The latent folder of resolution R (its train- and val-*.tar), checked against the walk's VAE."""
        from d3ds2.pipeline import resolve_run

        folder = self.data.latents_dir(R)
        return [f"data.train_shards={folder}", f"data.val_shards={folder}", f"data.vae_ckpt={resolve_run(self.vae_run)[1]}",
                f"data.num_workers={self.loader_workers()}"]

    def conditioner(self) -> str:
        cfg = ",".join(f"{k}:{v}" for k, v in self.s["dino"].items())
        return f"model.conditioner={{_target_:d3ds2.models.conditioner.ImageConditioner,config:{{{cfg}}}}}"

    def index_vae(self) -> dict:
        s, R = self.s, self.s["index_res"]
        cmd = self.common(s["index_vae_exp"], s["index_vae_steps"]) + self.latent_data(R) + [f"model.resolution={R // 8}"]
        return self.train("index_vae", s["index_vae_exp"], cmd)

    def index_dit(self) -> dict:
        s, R = self.s, self.s["index_res"]
        cmd = self.common(s["index_dit_exp"], s["index_dit_steps"]) + self.latent_data(R) + [
            f"model.resolution={R // 8}", f"model.net.resolution={R // 32}", self.conditioner(),
            f"model.net.cond_channels={s['dino']['hidden_size']}", f"chain.vae={s['index_vae_exp']}",
            f"model.picture_sampling.steps={s['picture_steps']}"]
        return self.train("index_dit", s["index_dit_exp"], cmd)

    def dit(self, i: int) -> dict:
        s, R = self.s, self.s["dit_res"][i]
        task = f"walk_dit_{R}"
        from omegaconf import OmegaConf

        latent = OmegaConf.load(self.vae_run / "config_resolved.yaml").model.net.latent_channels
        cmd = self.common(s["dit_exp"], s["dit_steps"][i]) + self.latent_data(R) + [
            f"task_name={task}", f"model.resolution={R}", f"model.net.in_channels={latent}",
            f"model.net.cond_channels={s['dino']['hidden_size']}", self.conditioner(),
            f"model.latent_stats={self.data.latent_stats(R)}",
            f"chain.vae={s['vae_exp']}", f"model.picture_sampling.steps={s['picture_steps']}",
            f"chain.init={'walk_dit_' + str(s['dit_res'][i - 1]) if i else 'null'}", "data.cache=false"]
        return self.train(f"dit_{R}", task, cmd)

    def views(self, split: str, limit: int = 16) -> tuple[Path, Path]:
        """First view of up to ``limit`` shapes of a split -> views/<label>/<key>.png; their source meshes ->
        refs/<label>/<key>.<ext> (the references evaluate.py re-normalises like data prep did)."""
        part = self.label(split)
        views, refs = self.work / "views" / part, self.work / "refs" / part
        for d in (views, refs):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        sources = {}
        for manifest in (Path(self.data.root) / "manifest").glob("*.jsonl"):
            for line in manifest.read_text().splitlines():
                r = json.loads(line)
                sources[r["key"]] = r["source"]
        n = 0
        for shard in shard_urls(self.data.shards_dir, split):
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    key, _, rest = m.name.partition(".")
                    if rest == "view000.png" and n < limit:
                        (views / f"{key}.png").write_bytes(tar.extractfile(m).read())
                        src = Path(sources[key])
                        shutil.copy2(src, refs / f"{key}{src.suffix}")
                        n += 1
        return views, refs

    @staticmethod
    def label(split: str) -> str:
        """Stage-name form of a split: the train meshes are the held-in ones, the val meshes the held-out ones."""
        return {"train": "heldin", "val": "heldout"}[split]

    def infer(self, split: str) -> dict:
        views, _ = self.views(split)
        part = self.label(split)
        gen = self.work / "generated" / part
        shutil.rmtree(gen, ignore_errors=True)
        gen.mkdir(parents=True)
        steps = self.s["sample_steps"]
        out = self.run(f"infer_{part}", [
            "inference.py", f"image={views}", f"out={gen / 'g.ply'}", f"device={self.device}",
            f"ckpt.index_dit={self.work / 'logs' / self.s['index_dit_exp'] / RUN}",
            f"ckpt.sparse_dit_512={self.work / 'logs' / ('walk_dit_' + str(self.s['dit_res'][-1])) / RUN}",
            f"ckpt.vae_512={self.vae_run}", f"dense.steps={steps}", f"sparse_512.steps={steps}"])
        keys = sorted(p.stem for p in views.glob("*.png"))
        made = sorted(gen.glob("g*.ply"))
        for key, path in zip(keys, made if len(keys) > 1 else [gen / "g.ply"]):
            path.rename(gen / f"{key}.ply")
        return {"images": len(keys), "timings": [x.strip() for x in out.splitlines() if " s  peak" in x]}

    def evaluate(self, split: str) -> dict:
        """evaluate.py's summary metrics; a call that scored no mesh (every generated mesh empty, as the tiny
        size's are) exits non-zero after writing its summary: the stage records that status and error."""
        part = self.label(split)
        out = self.work / "eval" / part
        summary_path = out / "summary.json"
        summary_path.unlink(missing_ok=True)
        try:
            self.run(f"evaluate_{part}", ["evaluate.py", f"pred_dir={self.work / 'generated' / part}",
                                          f"ref_dir={self.work / 'refs' / part}", f"out={out}", "n_points=20000",
                                          f"hydra.run.dir={out}"])
        except RuntimeError:
            if not summary_path.is_file():
                raise
        summary = json.loads(summary_path.read_text())
        return {"status": summary["status"], **({"error": summary["error"]} if "error" in summary else {}),
                **summary["metrics"]}

    # ------------------------------------------------------------------------------------------
    def stages(self) -> list:
        """(name, function returning the stage's metrics) in order."""
        return [("corpus", self.corpus), ("prep", self.prep), ("vae", self.vae), ("vae_eval", self.vae_eval),
                  ("latents", self.latents), ("index_vae", self.index_vae), ("index_dit", self.index_dit),
                  *[(f"dit_{R}", lambda i=i: self.dit(i)) for i, R in enumerate(self.s["dit_res"])],
                  ("infer_heldin", lambda: self.infer("train")), ("infer_heldout", lambda: self.infer("val")),
                  ("evaluate_heldin", lambda: self.evaluate("train")),
                  ("evaluate_heldout", lambda: self.evaluate("val"))]

    def walk(self) -> None:
        stages = self.stages()
        try:
            for name, fn in stages:
                self.stage(name, fn)
        except OutOfTime as e:
            todo = [n for n, _ in stages if self.record["stages"].get(n, {}).get("status") != "done"]
            print(f"[walk] stopped at {e}; left: {todo}. Run the same command again to continue.", flush=True)
            self.record["left"] = todo
            self.save()
            return
        self.record["left"] = []
        self.save()
        print(f"[walk] all stages done; record: {self.record_path}", flush=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    bad = [a for a in argv if "=" not in a]
    if bad or "work" not in opts:
        raise SystemExit(f"usage: python benchmarks/schedule_walk.py work=DIR [size=tiny|small|full] [budget_s=S] "
                         f"[device=cuda|cpu] [out=FILE.json] [until=STAGE] (bad: {bad})")
    Walk(opts).walk()


if __name__ == "__main__":
    main(sys.argv[1:])
