"""CSV / console / TensorBoard logging and evaluation videos."""
import csv
import datetime
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Union

import imageio
import numpy as np
import torch

COMMON_TRAIN_FORMAT = [('frame', 'F', 'int'), ('step', 'S', 'int'), ('episode', 'E', 'int'),
                       ('episode_length', 'L', 'int'), ('episode_reward', 'R', 'float'),
                       ('buffer_size', 'BS', 'int'), ('buffer_bytes', 'BUF', 'bytes'),
                       ('fps', 'FPS', 'float'), ('total_time', 'T', 'time')]

COMMON_EVAL_FORMAT = [('frame', 'F', 'int'), ('step', 'S', 'int'), ('episode', 'E', 'int'),
                      ('episode_length', 'L', 'int'), ('episode_reward', 'R', 'float'),
                      ('total_time', 'T', 'time')]

_COLORS = {'train': '\033[33m', 'eval': '\033[32m'}
_RESET = '\033[0m'


class AverageMeter:
    """Running mean of logged values."""

    def __init__(self) -> None:
        self._sum = 0.0
        self._count = 0

    def update(self, value: float, n: int = 1) -> None:
        """Add a value observed n times."""
        self._sum += value
        self._count += n

    def value(self) -> float:
        """Mean of the values added so far."""
        return self._sum / max(1, self._count)


class MetersGroup:
    """Meters for one prefix ('train' or 'eval'), dumped as one CSV row plus one console line."""

    def __init__(self, csv_file_name: Path, formating: list, keep_rows: Optional[int] = None) -> None:
        """A fresh CSV, or (keep_rows given) the existing one continued after its first keep_rows rows."""
        self._csv_file_name = csv_file_name
        self._formating = formating
        self._meters = defaultdict(AverageMeter)
        self._fieldnames: Optional[list] = None
        self.rows = 0
        if keep_rows is not None and csv_file_name.exists():
            fieldnames, rows = self._read_rows()
            self._fieldnames = fieldnames or None
            self.rows = min(keep_rows, len(rows))
            if len(rows) > self.rows:  # logged after the snapshot; the resumed run logs them again
                self._write_rows(fieldnames, rows[:self.rows])

    def log(self, key: str, value: float, n: int = 1) -> None:
        """Add a value to the meter called key."""
        self._meters[key].update(value, n)

    def _prime_meters(self) -> dict:
        data = {}
        for key, meter in self._meters.items():
            # 'train/critic_loss' -> 'critic_loss'
            data[key.split('/', 1)[1].replace('/', '_')] = meter.value()
        return data

    def _read_rows(self) -> tuple:
        with self._csv_file_name.open('r', newline='') as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)

    def _write_rows(self, fieldnames: list, rows: list) -> None:
        # Replaced atomically: a kill while rewriting must not lose the rows already logged.
        tmp = self._csv_file_name.with_name(self._csv_file_name.name + '.tmp')
        # Missing values (e.g. losses before updates start) are left empty, not faked as zeros.
        with tmp.open('w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames, restval='')
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self._csv_file_name)

    def _dump_to_csv(self, data: dict) -> None:
        if self._fieldnames is None or not set(data) <= set(self._fieldnames):
            # A new file, or a new column: rewrite it so that every row shares one header.
            rows = self._read_rows()[1] if self._fieldnames is not None else []
            self._fieldnames = sorted(set(self._fieldnames or ()) | set(data))
            self._write_rows(self._fieldnames, rows)
        with self._csv_file_name.open('a', newline='') as f:
            csv.DictWriter(f, fieldnames=self._fieldnames, restval='').writerow(data)
        self.rows += 1

    @staticmethod
    def _format(key: str, value: float, ty: str) -> str:
        if ty == 'int':
            return f'{key}: {int(value)}'
        if ty == 'float':
            return f'{key}: {value:.04f}'
        if ty == 'bytes':
            return f'{key}: {value / 2 ** 20:.1f}MiB'
        if ty == 'time':
            return f'{key}: {datetime.timedelta(seconds=int(value))}'
        raise ValueError(f'invalid format type: {ty}')

    def _dump_to_console(self, data: dict, prefix: str) -> None:
        pieces = [f'| {_COLORS.get(prefix, "")}{prefix: <14}{_RESET}']
        for key, disp_key, ty in self._formating:
            pieces.append(self._format(disp_key, data.get(key, 0), ty))
        print(' | '.join(pieces), flush=True)

    def dump(self, step: int, prefix: str) -> None:
        """Write the averaged meters as one row at frame `step` and clear them."""
        if not self._meters:
            return
        data = self._prime_meters()
        data['frame'] = step
        self._dump_to_csv(data)
        self._dump_to_console(data, prefix)
        self._meters.clear()


class Logger:
    """Routes 'train/...' and 'eval/...' scalars to CSV files, the console and optionally TensorBoard."""

    def __init__(self, log_dir: Union[str, Path], use_tb: bool, state: Optional[dict] = None) -> None:
        """Start fresh logs, or continue those that `state` (from state_dict) describes."""
        self._log_dir = Path(log_dir)
        state = state or {}
        self._train_mg = MetersGroup(self._log_dir / 'train.csv', COMMON_TRAIN_FORMAT, state.get('train_rows'))
        self._eval_mg = MetersGroup(self._log_dir / 'eval.csv', COMMON_EVAL_FORMAT, state.get('eval_rows'))
        self._step = state.get('step', 0)
        self._sw = None
        if use_tb:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step hides the events a killed run wrote after its snapshot.
            purge_step = self._step + 1 if state else None
            self._sw = SummaryWriter(str(self._log_dir / 'tb'), purge_step=purge_step)

    def state_dict(self) -> dict:
        """Rows written so far and the last step logged, to continue the logs after a resume."""
        return {'train_rows': self._train_mg.rows, 'eval_rows': self._eval_mg.rows, 'step': self._step}

    def log(self, key: str, value: Any, step: int) -> None:
        """Record value under key ('train/<name>' or 'eval/<name>') at frame step."""
        assert key.startswith('train/') or key.startswith('eval/'), key
        if isinstance(value, torch.Tensor):
            value = value.item()
        value = float(value)
        self._step = max(self._step, step)
        if self._sw is not None:
            self._sw.add_scalar(key, value, step)
        mg = self._train_mg if key.startswith('train/') else self._eval_mg
        mg.log(key, value)

    def log_metrics(self, metrics: dict, step: int, ty: str) -> None:
        """Log every entry of metrics under prefix ty."""
        for key, value in metrics.items():
            self.log(f'{ty}/{key}', value, step)

    def dump(self, step: int, ty: Optional[str] = None) -> None:
        """Write the averaged meters of ty ('train', 'eval' or both when None)."""
        if ty is None or ty == 'eval':
            self._eval_mg.dump(step, 'eval')
        if ty is None or ty == 'train':
            self._train_mg.dump(step, 'train')
        if self._sw is not None:
            self._sw.flush()

    def log_and_dump_ctx(self, step: int, ty: str) -> 'LogAndDumpCtx':
        """Context manager yielding log(key, value) that dumps ty's meters on exit."""
        return LogAndDumpCtx(self, step, ty)

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._sw is not None:
            self._sw.close()


class LogAndDumpCtx:
    """Callable log(key, value) bound to one step and prefix; dumps on exit."""

    def __init__(self, logger: Logger, step: int, ty: str) -> None:
        self._logger = logger
        self._step = step
        self._ty = ty

    def __enter__(self) -> 'LogAndDumpCtx':
        return self

    def __call__(self, key: str, value: Any) -> None:
        self._logger.log(f'{self._ty}/{key}', value, self._step)

    def __exit__(self, *args: Any) -> bool:
        self._logger.dump(self._step, self._ty)
        return False


def _save_mp4(path: Path, frames: list, fps: int) -> None:
    # macro_block_size=1 keeps frame sizes that are not multiples of 16 (e.g. 84) unchanged.
    imageio.mimsave(str(path), frames, fps=fps, macro_block_size=1)


class VideoRecorder:
    """Records rendered env frames during evaluation and saves them to <root_dir>/eval_video/."""

    def __init__(self, root_dir: Optional[Union[str, Path]], render_size: int = 256, fps: int = 20,
                 camera_id: int = 0) -> None:
        self.save_dir = None
        if root_dir is not None:
            self.save_dir = Path(root_dir) / 'eval_video'
            self.save_dir.mkdir(parents=True, exist_ok=True)
        self.render_size = render_size
        self.fps = fps
        self.camera_id = camera_id
        self.frames: list = []
        self.enabled = False

    def init(self, env: Any, enabled: bool = True) -> None:
        """Start a new video (if enabled) with the env's current frame."""
        self.frames = []
        self.enabled = self.save_dir is not None and enabled
        self.record(env)

    def record(self, env: Any) -> None:
        """Append the env's current rendered frame."""
        if self.enabled:
            self.frames.append(env.physics.render(height=self.render_size, width=self.render_size,
                                                  camera_id=self.camera_id))

    def save(self, file_name: str) -> None:
        """Write the recorded frames to save_dir/file_name."""
        if self.enabled and self.frames:
            _save_mp4(self.save_dir / file_name, self.frames, self.fps)


class TrainVideoRecorder:
    """Records the agent's own (newest stacked) observation frames to <root_dir>/train_video/."""

    def __init__(self, root_dir: Optional[Union[str, Path]], channels: int, render_size: int = 256,
                 fps: int = 20) -> None:
        self.save_dir = None
        if root_dir is not None:
            self.save_dir = Path(root_dir) / 'train_video'
            self.save_dir.mkdir(parents=True, exist_ok=True)
        self.channels = channels
        self.render_size = render_size
        self.fps = fps
        self.frames: list = []
        self.enabled = False

    def init(self, obs: np.ndarray, enabled: bool = True) -> None:
        """Start a new video (if enabled) with obs."""
        self.frames = []
        self.enabled = self.save_dir is not None and enabled
        self.record(obs)

    def record(self, obs: np.ndarray) -> None:
        """Append the newest frame of a stacked (C * frame_stack, H, W) observation."""
        if not self.enabled:
            return
        frame = np.asarray(obs[-self.channels:]).transpose(1, 2, 0)
        if frame.shape[2] == 1:
            frame = np.repeat(frame, 3, axis=2)
        # Nearest-neighbour upscaling by an integer factor (no image library available).
        scale = max(1, self.render_size // frame.shape[0])
        self.frames.append(frame.repeat(scale, axis=0).repeat(scale, axis=1))

    def save(self, file_name: str) -> None:
        """Write the recorded frames to save_dir/file_name."""
        if self.enabled and self.frames:
            _save_mp4(self.save_dir / file_name, self.frames, self.fps)
