"""The callbacks that are part of the algorithm (teacher schedule, reward statistics), grad-norm logging and
checkpoints: pure predicates without a Trainer, hooks with a stand-in trainer, mechanisms on a toy module.

The same callbacks on the tiny Qwen3 through the real CLI are in ``test_resume.py`` and ``test_ddp.py``.
"""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.loggers import TensorBoardLogger

from egrsd_pl.callbacks.checkpoint import (
    AdapterCheckpoint,
    adapter_dir,
    find_last_checkpoint,
    restore_rng_states,
    rng_states,
)
from egrsd_pl.callbacks.graceful_stop import GracefulStop
from egrsd_pl.callbacks.grad_norm import GradNormMonitor
from egrsd_pl.callbacks.reward_statistics import RewardStatistics
from egrsd_pl.callbacks.teacher_update import TeacherUpdate
from egrsd_pl.checkpoint_io import AtomicCheckpointIO, DamagedCheckpointError, checkpoint_damage
from egrsd_pl.teacher import Teacher

# ---------------------------------------------------------------- teacher schedule


def test_crisp_schedule_refreshes_after_steps_50_and_100():
    # CRISP's M = 50 over the paper's 100 steps: steps 1-50 use theta_0, steps 51-100 use theta_50.
    assert [s for s in range(0, 101) if TeacherUpdate("hard_copy", every_k_steps=50).should_update(s)] == [
        50,
        100,
    ]


def test_should_update_frozen_never_ema_every_step_hard_copy_at_multiples_of_k():
    steps = range(0, 13)
    assert [s for s in steps if TeacherUpdate("frozen").should_update(s)] == []
    assert [s for s in steps if TeacherUpdate("ema").should_update(s)] == list(range(1, 13))
    assert [s for s in steps if TeacherUpdate("hard_copy", every_k_steps=4).should_update(s)] == [4, 8, 12]
    assert [s for s in steps if TeacherUpdate("hard_copy", every_k_steps=1).should_update(s)] == list(
        range(1, 13)
    )


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"schedule": "swa"}, "--teacher.schedule"),
        ({"ema_alpha": 1.0}, "--teacher.ema_alpha"),
        ({"every_k_steps": 0}, "--teacher.every_k_steps"),
    ],
)
def test_teacher_update_validates_its_flags(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        TeacherUpdate(**kwargs)


class _RecordingTeacher(Teacher):
    """A :class:`Teacher` without adapters that records the α of each update."""

    def __init__(self, schedule) -> None:
        super().__init__(schedule)
        self.alphas: list[float] = []

    def blend(self, alpha: float) -> None:
        self.alphas.append(alpha)


class _RecordingModule:
    """Stands in for EGRSDModule: a recording teacher, and the statistics the callbacks hand over."""

    def __init__(self, teacher: str = "ema") -> None:
        self.teacher = _RecordingTeacher(teacher)
        self.alphas = self.teacher.alphas
        self.reward_statistics = None
        self.device = torch.device("cpu")

    def log(self, *args, **kwargs) -> None:
        pass

    def log_dict(self, *args, **kwargs) -> None:
        pass


def _run_batches(callback: L.Callback, module, global_steps: list[int], trainer=None) -> None:
    """``setup``, then ``on_train_batch_end`` once per micro-batch, with the trainer's step counter after it."""
    trainer = trainer or SimpleNamespace(global_step=0)
    callback.setup(trainer, module, "fit")
    for batch_idx, step in enumerate(global_steps):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, batch_idx)


def test_hard_copy_fires_exactly_at_multiples_of_k_with_alpha_zero():
    callback, module = TeacherUpdate("hard_copy", every_k_steps=3), _RecordingModule("hard_copy")
    _run_batches(callback, module, list(range(1, 11)))  # optimizer steps 1..10
    assert module.alphas == [0.0, 0.0, 0.0]  # after steps 3, 6, 9
    assert module.teacher.num_updates == 3 and callback.state_dict()["last_updated_step"] == 9


def test_ema_fires_once_per_optimizer_step_under_gradient_accumulation():
    callback, module = TeacherUpdate("ema", ema_alpha=0.9), _RecordingModule("ema")
    # accumulate_grad_batches=3: the counter moves on every third micro-batch only.
    _run_batches(callback, module, [0, 0, 1, 1, 1, 2, 2, 2, 3])
    assert module.alphas == [0.9, 0.9, 0.9]  # steps 1, 2, 3: once each


def test_teacher_update_state_round_trip_and_schedule_change_is_refused():
    callback = TeacherUpdate("hard_copy", every_k_steps=2)
    _run_batches(callback, _RecordingModule("hard_copy"), [1, 2, 3, 4])
    restored, module = TeacherUpdate("hard_copy", every_k_steps=2), _RecordingModule("hard_copy")
    restored.setup(None, module, "fit")
    restored.load_state_dict(callback.state_dict())
    assert restored.state_dict() == {"schedule": "hard_copy", "num_updates": 2, "last_updated_step": 4}
    assert module.teacher.state_dict() == restored.state_dict()  # the state lives in the module's teacher
    ema = TeacherUpdate("ema")
    ema.setup(None, _RecordingModule("ema"), "fit")
    with pytest.raises(ValueError, match="cannot change on resume"):
        ema.load_state_dict(callback.state_dict())


def test_teacher_update_refuses_a_checkpoint_without_teacher_adapter():
    student_only = {"state_dict": {"policy.base_model.model.q_proj.lora_A.default.weight": torch.zeros(1)}}
    with pytest.raises(ValueError, match="no teacher adapter"):
        TeacherUpdate("ema").on_load_checkpoint(None, None, student_only)
    TeacherUpdate("frozen").on_load_checkpoint(None, None, student_only)  # nothing to restore


def test_teacher_update_refuses_a_module_with_another_schedule():
    with pytest.raises(ValueError, match="--teacher.schedule 'ema' disagrees with --model.teacher 'frozen'"):
        TeacherUpdate("ema").setup(None, _RecordingModule("frozen"), "fit")


def _tiny_module(model_dir, teacher: str):
    from egrsd_pl.module import EGRSDModule

    module = EGRSDModule(model_name_or_path=str(model_dir), teacher=teacher, lora_rank=4, lora_alpha=8)
    module.configure_model()
    return module


def _randomize(tensors: dict[str, torch.Tensor], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in tensors.values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)


def _clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer here
def test_ema_teacher_after_one_update_is_alpha_teacher_plus_one_minus_alpha_student(tiny_model_dir):
    module = _tiny_module(tiny_model_dir, "ema")
    student, teacher = module.adapter_parameters("default"), module.adapter_parameters("teacher")
    layers = module.policy.get_base_model().config.num_hidden_layers
    assert student.keys() == teacher.keys() and len(student) == layers * 2 * 7  # (A, B) x 7 projections
    assert all(p.requires_grad for p in student.values()) and not any(
        p.requires_grad for p in teacher.values()
    )
    _randomize(student, seed=1)
    _randomize(teacher, seed=2)
    before_student, before_teacher = _clone(student), _clone(teacher)
    _run_batches(TeacherUpdate("ema", ema_alpha=0.99), module, [1])
    for key, updated in module.adapter_parameters("teacher").items():
        expected = 0.99 * before_teacher[key] + 0.01 * before_student[key]
        assert torch.allclose(updated, expected, rtol=0, atol=1e-7), key  # float32 rounding only
        assert not torch.equal(updated, before_teacher[key])
    assert all(torch.equal(v, before_student[k]) for k, v in module.adapter_parameters("default").items())


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer here
def test_hard_copy_makes_the_teacher_equal_the_student_only_at_multiples_of_k(tiny_model_dir):
    module = _tiny_module(tiny_model_dir, "hard_copy")
    callback = TeacherUpdate("hard_copy", every_k_steps=2)
    _randomize(module.adapter_parameters("default"), seed=3)
    trainer = SimpleNamespace(global_step=1)
    callback.setup(trainer, module, "fit")
    callback.on_train_batch_end(trainer, module, None, None, 0)  # step 1: not a multiple of 2
    assert all(
        not torch.equal(t, module.adapter_parameters("default")[k])
        for k, t in module.adapter_parameters("teacher").items()
        if "lora_A" in k
    )
    trainer.global_step = 2
    callback.on_train_batch_end(trainer, module, None, None, 1)
    assert all(
        torch.equal(t, module.adapter_parameters("default")[k])
        for k, t in module.adapter_parameters("teacher").items()
    )


@pytest.mark.parametrize(
    ("teacher", "callbacks", "message"),
    [
        ("frozen", [TeacherUpdate("frozen")], "running reward statistics are part of the algorithm"),
        ("ema", [RewardStatistics()], "needs callbacks.TeacherUpdate"),
    ],
)
def test_module_refuses_to_train_without_the_algorithm_callbacks(
    tiny_model_dir, tmp_path, teacher, callbacks, message
):
    from egrsd_pl.datamodule import RolloutDataModule
    from egrsd_pl.module import EGRSDModule

    module = EGRSDModule(model_name_or_path=str(tiny_model_dir), teacher=teacher)
    trainer = _trainer(tmp_path, callbacks, max_steps=1, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match=message):
        trainer.fit(module, datamodule=RolloutDataModule(train_source="synthetic:4", batch_size=2))
    assert module.policy is None  # it failed before loading the model


# ---------------------------------------------------------------- reward statistics


class _GatherIdentity:
    """Single-process strategy stand-in: ``all_gather`` returns the tensor itself."""

    @staticmethod
    def all_gather(tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def test_reward_statistics_merge_once_per_optimizer_step_after_all_micro_batches():
    callback, module = RewardStatistics(warmup_steps=1), _RecordingModule()
    trainer = SimpleNamespace(global_step=0, strategy=_GatherIdentity())
    # Step 1 = two micro-batches (accumulation 2); the advantage of both uses the statistics before step 1.
    assert torch.equal(callback.stats.advantages(torch.tensor([1.0, 0.0])), torch.tensor([0.5, -0.5]))
    _run_batches(callback, module, [], trainer)  # setup: the module now reads the callback's statistics
    assert module.reward_statistics is callback.stats
    callback.stats.record(torch.tensor([1.0, 0.0]))
    _run_batches(callback, module, [0], trainer)  # micro-batch 1: no optimizer step, nothing merged
    assert callback.stats.count == 0
    callback.stats.record(torch.tensor([1.5, 0.5]))
    _run_batches(callback, module, [1], trainer)  # micro-batch 2 stepped: merge all four rewards
    # rewards 1, 0, 1.5, 0.5: mean 0.75; squared deviations 0.0625 + 0.5625 + 0.5625 + 0.0625 = 1.25 -> var 0.3125
    assert callback.stats.count == 4 and callback.stats.steps == 1
    assert callback.stats.mean == pytest.approx(0.75, abs=1e-12)
    assert callback.stats.std == pytest.approx(0.3125**0.5, abs=1e-12)
    _run_batches(callback, module, [1], trainer)  # the hook again at the same step: no second merge
    assert callback.stats.count == 4
    # Step 2 (warm-up of 1 step over): A = (r - 0.75) / sqrt(0.3125); r = 1.75 -> 1 / 0.5590 = 1.7889
    assert callback.stats.advantages(torch.tensor([1.75])).item() == pytest.approx(1 / 0.3125**0.5, abs=1e-6)


def test_reward_statistics_state_round_trip():
    callback = RewardStatistics()
    callback.stats.record(torch.tensor([0.25, 1.0, 0.0]))
    _run_batches(
        callback, _RecordingModule(), [1], SimpleNamespace(global_step=0, strategy=_GatherIdentity())
    )
    restored = RewardStatistics()
    restored.load_state_dict(callback.state_dict())
    assert restored.state_dict() == callback.state_dict()
    assert restored.state_dict()["last_updated_step"] == 1


def test_reward_statistics_should_update_is_once_per_step():
    assert not RewardStatistics.should_update(0, -1)  # no optimizer step yet
    assert RewardStatistics.should_update(1, -1)
    assert not RewardStatistics.should_update(1, 1)  # already merged at step 1
    assert RewardStatistics.should_update(2, 1)


# ---------------------------------------------------------------- toy Lightning runs


class _Linear(L.LightningModule):
    """``loss = w · x`` on a constant batch: the gradient is ``x`` and AdamW's moments carry history."""

    def __init__(self, x: list[float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(len(x)))
        self.register_buffer("x", torch.tensor(x))

    def training_step(self, batch, batch_idx):
        return (self.w * self.x).sum() + 0.0 * batch.sum()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)


class _Capture(L.Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _trainer(tmp_path: Path, callbacks: list[L.Callback], **kwargs) -> L.Trainer:
    kwargs = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        **kwargs,
    }
    return L.Trainer(callbacks=callbacks, **kwargs)


def test_grad_norm_logs_preclip_norm_and_whether_clipping_acted(tmp_path):
    capture = _Capture()
    trainer = _trainer(
        tmp_path, [GradNormMonitor(), capture], max_steps=1, gradient_clip_val=0.1, enable_checkpointing=False
    )
    trainer.fit(_Linear([3.0, 4.0]))
    # grad = x = (3, 4): ||grad|| = sqrt(9 + 16) = 5 before clipping; 5 > 0.1 so clipping acted
    assert capture.metrics[0]["grad/norm_preclip"] == pytest.approx(5.0, abs=1e-6)
    assert capture.metrics[0]["grad/clipped"] == 1.0


def test_grad_norm_reports_no_clipping_below_the_threshold(tmp_path):
    capture = _Capture()
    trainer = _trainer(
        tmp_path, [GradNormMonitor(), capture], max_steps=1, gradient_clip_val=1.0, enable_checkpointing=False
    )
    trainer.fit(_Linear([0.3, 0.4]))
    # ||(0.3, 0.4)|| = 0.5 < 1.0: not clipped
    assert capture.metrics[0]["grad/norm_preclip"] == pytest.approx(0.5, abs=1e-6)
    assert capture.metrics[0]["grad/clipped"] == 0.0


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.save(rng_states(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert (
        torch.equal(expected[0], again[0])
        and np.array_equal(expected[1], again[1])
        and expected[2] == again[2]
    )


def test_adapter_dir_sits_beside_the_checkpoint():
    assert adapter_dir("runs/x/checkpoints/epoch=0-step=25.ckpt") == Path(
        "runs/x/checkpoints/epoch=0-step=25_adapter"
    )
    assert adapter_dir("runs/x/checkpoints/last.ckpt") == Path("runs/x/checkpoints/last_adapter")


def test_checkpoint_defaults_keep_every_checkpoint_every_25_steps_and_last():
    callback = AdapterCheckpoint()
    assert (callback._every_n_train_steps, callback.save_last, callback.save_top_k) == (25, True, -1)


def test_checkpoint_saves_periodically_and_at_the_end_of_training(tmp_path):
    checkpoint = AdapterCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_adapter=False)
    _trainer(tmp_path, [checkpoint], max_steps=5).fit(_Linear([1.0, -2.0]))
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    # steps 2 and 4 periodically, 5 as the final step (ModelCheckpoint alone would drop it), last = step 5
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=5.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 5


def test_ckpt_path_last_finds_the_newest_last_checkpoint_of_every_logger_version(tmp_path):
    for version, mtime in (("version_0", 1_000), ("version_1", 2_000)):
        folder = tmp_path / "runs" / "exp" / version / "checkpoints"
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(b"")
        (folder / "epoch=0-step=2.ckpt").write_bytes(b"")
        os.utime(folder / "last.ckpt", (mtime, mtime))
    trainer = _trainer(tmp_path, [], logger=TensorBoardLogger(str(tmp_path / "runs"), name="exp"))
    found = find_last_checkpoint(trainer)  # this run will log into version_2
    assert found == tmp_path / "runs" / "exp" / "version_1" / "checkpoints" / "last.ckpt"  # the newer one
    explicit = AdapterCheckpoint(dirpath=str(tmp_path / "runs" / "exp" / "version_0" / "checkpoints"))
    assert find_last_checkpoint(_trainer(tmp_path, [explicit])) == Path(explicit.dirpath) / "last.ckpt"
    assert find_last_checkpoint(_trainer(tmp_path / "empty", [], logger=False)) is None


class _SendSignal(L.Callback):
    """Sends ``signum`` to this process during micro-batch ``at_batch`` (0-based, before its end)."""

    def __init__(self, signum: int, at_batch: int) -> None:
        self.signum, self.at_batch = signum, at_batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at_batch:
            os.kill(os.getpid(), self.signum)


@pytest.mark.filterwarnings(
    "ignore:Checkpoint directory .* exists and is not empty"
)  # the resume, on purpose
@pytest.mark.parametrize(
    ("signum", "exit_code", "accumulate"),
    [(signal.SIGTERM, None, 1), (signal.SIGINT, 1, 1), (signal.SIGTERM, None, 2), (signal.SIGINT, 1, 2)],
)
def test_signal_finishes_the_step_checkpoints_and_the_resumed_run_matches(
    tmp_path, signum, exit_code, accumulate
):
    """The signal arrives in the first micro-batch of optimizer step 2; step 2 still completes and is saved."""
    sigint = signal.getsignal(signal.SIGINT)
    options = {"max_steps": 4, "accumulate_grad_batches": accumulate}
    try:
        straight = _Linear([1.0, -2.0])
        _trainer(tmp_path / "a", [], enable_checkpointing=False, **options).fit(straight)

        first = _Linear([1.0, -2.0])
        checkpoint = AdapterCheckpoint(
            dirpath=str(tmp_path / "b"), every_n_train_steps=100, save_adapter=False
        )
        with pytest.raises(SystemExit) as stopped:
            signal_at = _SendSignal(
                signum, at_batch=accumulate
            )  # micro-batch 1 (no accumulation) or 2 (of 2)
            _trainer(tmp_path / "b", [checkpoint, GracefulStop(), signal_at], **options).fit(first)
        assert stopped.value.code == exit_code  # SIGTERM: Lightning's SIGTERMException; Ctrl-C: exit 1
        saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=False)
        assert saved["global_step"] == 2  # step 2 finished before stopping

        resumed = _Linear([1.0, -2.0])
        checkpoint = AdapterCheckpoint(
            dirpath=str(tmp_path / "b"), every_n_train_steps=100, save_adapter=False
        )
        _trainer(tmp_path / "b", [checkpoint], **options).fit(resumed, ckpt_path="last")
        # AdamW moments travel with the checkpoint: 2 + 2 steps equal 4 straight steps
        assert torch.equal(resumed.w, straight.w)
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after a KeyboardInterrupt


# ---------------------------------------------------------------- atomic checkpoint files


class _KilledMidWrite(TorchCheckpointIO):
    """Writes the first half of the checkpoint's bytes, then dies (as a process killed mid-write would)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).write_bytes(buffer.getvalue()[: buffer.tell() // 2])
        raise KeyboardInterrupt


def test_a_write_killed_midway_leaves_the_previous_last_checkpoint_whole(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 4}, target)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO(_KilledMidWrite()).save_checkpoint(
            {"global_step": 6, "big": torch.zeros(10_000)}, target
        )
    assert checkpoint_damage(target) is None
    assert torch.load(target, weights_only=True) == {"global_step": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left behind


@pytest.mark.filterwarnings(
    "ignore:Checkpoint directory .* exists and is not empty"
)  # the resume, on purpose
def test_truncated_last_checkpoint_names_the_newest_intact_one_and_resuming_from_it_is_exact(tmp_path):
    straight = _Linear([1.0, -2.0])
    _trainer(tmp_path / "a", [], enable_checkpointing=False, max_steps=6).fit(straight)

    folder = tmp_path / "b"
    first = _Linear([1.0, -2.0])
    checkpoint = AdapterCheckpoint(dirpath=str(folder), every_n_train_steps=2, save_adapter=False)
    _trainer(folder, [checkpoint], max_steps=4).fit(first)
    last = folder / "last.ckpt"
    intact = folder / "epoch=0-step=4.ckpt"
    os.utime(intact, (last.stat().st_mtime + 1,) * 2)  # newest on disk, whatever the clock's resolution
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a half-written file
    assert checkpoint_damage(last) is not None and checkpoint_damage(intact) is None

    checkpoint = AdapterCheckpoint(dirpath=str(folder), every_n_train_steps=2, save_adapter=False)
    with pytest.raises(DamagedCheckpointError) as error:
        _trainer(folder, [checkpoint], max_steps=6).fit(_Linear([1.0, -2.0]), ckpt_path=str(last))
    message = str(error.value)
    assert (
        "\n" not in message
        and str(last) in message
        and f"the newest intact checkpoint there is {str(intact)!r}" in message
    )

    resumed = _Linear([1.0, -2.0])
    checkpoint = AdapterCheckpoint(dirpath=str(folder), every_n_train_steps=2, save_adapter=False)
    _trainer(folder, [checkpoint], max_steps=6).fit(resumed, ckpt_path=str(intact))
    assert torch.equal(resumed.w, straight.w)  # 4 + 2 steps equal 6 straight steps, AdamW moments included
