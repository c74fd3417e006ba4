"""Train DrQ-v2 on a pixel-based DMC task with an on-disk (none) or in-RAM (half/full) replay buffer."""
import contextlib
from pathlib import Path
from typing import Iterator, Optional

import hydra
import numpy as np
import torch
from dm_env import specs
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import envs
import snapshot
import utils
from disk_replay import ReplayBufferStorage, make_replay_loader
from logger import Logger, TrainVideoRecorder, VideoRecorder

torch.backends.cudnn.benchmark = True

COMPRESSION_MODES = ('none', 'half', 'full')
POSITIVE_INTS = ('frame_stack', 'action_repeat', 'nstep', 'batch_size', 'snapshot_every_frames')


def validate_config(cfg: DictConfig) -> None:
    """Raise ValueError naming every bad setting and what is allowed, before anything is built."""
    problems = []
    if cfg.compression.mode not in COMPRESSION_MODES:
        problems.append(f'compression.mode={cfg.compression.mode!r} is unknown; '
                        f'allowed: {", ".join(COMPRESSION_MODES)}')
    bad_ints = [key for key in POSITIVE_INTS
                if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1]
    problems += [f'{key}={cfg[key]!r} is invalid; allowed: an integer >= 1' for key in bad_ints]
    if not {'frame_stack', 'nstep'} & set(bad_ints):
        needed = cfg.frame_stack + cfg.nstep
        if not isinstance(cfg.replay_buffer_size, int) or cfg.replay_buffer_size < needed:
            problems.append(f'replay_buffer_size={cfg.replay_buffer_size!r} is too small; allowed: an integer '
                            f'>= frame_stack + nstep = {needed}')
    for key in ('key_interval', 'anchor_interval', 'decode_threads'):
        value = cfg.compression.get(key, 1)
        if key == 'decode_threads' and value == 'auto':
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            allowed = 'an integer >= 1' + (" or 'auto'" if key == 'decode_threads' else '')
            problems.append(f'compression.{key}={value!r} is invalid; allowed: {allowed}')
    try:
        envs.check_task(cfg.task.name, floor=cfg.floor)
    except ValueError as error:
        problems.append(f'task.name={cfg.task.name!r}: {error}')
    if problems:
        raise ValueError('invalid configuration:\n  ' + '\n  '.join(problems))


def buffer_kwargs(cfg: DictConfig) -> dict:
    """ReplayBuffer arguments set by the compression group: full's intervals and compression.buffer."""
    kwargs = {key: cfg.compression[key] for key in ('key_interval', 'anchor_interval', 'decode_threads')
              if key in cfg.compression}
    if 'buffer' in cfg.compression:
        kwargs.update(OmegaConf.to_container(cfg.compression.buffer, resolve=True))
    return kwargs


class Workspace:
    """Owns envs, agent, replay and logger of one run and drives training and evaluation."""

    def __init__(self, cfg: DictConfig) -> None:
        self.work_dir = Path(HydraConfig.get().runtime.output_dir)
        print(f'workspace: {self.work_dir}')
        self.cfg = cfg
        self.snapshot_path = self.work_dir / 'snapshot.pt'
        # Read and check a snapshot before building anything: a bad one must stop the run at once.
        resumed = snapshot.load(self.snapshot_path, cfg) if self.snapshot_path.exists() else None
        OmegaConf.save(cfg, self.work_dir / 'config.yaml', resolve=True)
        utils.set_seed_everywhere(cfg.seed)
        self.device = utils.resolve_device(cfg.device)
        self.setup(resumed)
        self.agent = hydra.utils.instantiate(
            cfg.agent, obs_shape=self.train_env.observation_spec().shape,
            action_shape=self.train_env.action_spec().shape, device=str(self.device))
        self.timer = utils.Timer()
        self._global_step = 0
        self._global_episode = 0
        self._snapshot_frame = 0
        if resumed:
            self.restore(resumed)

    def setup(self, resumed: Optional[dict] = None) -> None:
        """Create logger, envs, replay and video recorders (the logs and `none`'s episodes continuing resumed's)."""
        cfg = self.cfg
        self.logger = Logger(self.work_dir, use_tb=cfg.use_tb, state=resumed['logger'] if resumed else None)
        env_kwargs = dict(name=cfg.task.name, frame_stack=cfg.frame_stack,
                          action_repeat=cfg.action_repeat, seed=cfg.seed,
                          grayscale=cfg.grayscale, floor=cfg.floor)
        self.train_env = envs.make(**env_kwargs)
        self.eval_env = envs.make(**env_kwargs)
        obs_spec = self.train_env.observation_spec()
        action_spec = self.train_env.action_spec()

        self.mode = cfg.compression.mode
        if self.mode == 'none':
            data_specs = (obs_spec, action_spec,
                          specs.Array((1,), np.float32, 'reward'),
                          specs.Array((1,), np.float32, 'discount'))
            # Episode files in the run dir that the snapshot does not list (all of them without one) are deleted.
            with self._snapshot_errors():
                self.replay_storage = ReplayBufferStorage(
                    data_specs, self.work_dir / 'buffer', max_size=cfg.replay_buffer_size, nstep=cfg.nstep,
                    state=snapshot.to_arrays(resumed['replay']) if resumed else None)
            self.replay_loader = make_replay_loader(
                self.work_dir / 'buffer', cfg.replay_buffer_size, cfg.batch_size,
                cfg.replay_buffer_num_workers, cfg.save_snapshot, cfg.nstep, cfg.discount)
        else:
            # Imported lazily so that the baseline runs without the compressed buffer.
            from replay_buffer import ReplayBuffer
            self.replay_storage = ReplayBuffer(
                obs_shape=obs_spec.shape, action_shape=action_spec.shape,
                capacity=cfg.replay_buffer_size, frame_stack=cfg.frame_stack, nstep=cfg.nstep,
                discount=cfg.discount, batch_size=cfg.batch_size, compression=self.mode,
                seed=cfg.seed, **buffer_kwargs(cfg))
        self._replay_iter = None
        self._prefetched = None  # a resumed in-RAM run's batch drawn before its snapshot, used first

        camera_id = 2 if cfg.task.name.startswith('quadruped') else 0
        self.video_recorder = VideoRecorder(self.work_dir if cfg.save_video else None,
                                            camera_id=camera_id)
        self.train_video_recorder = TrainVideoRecorder(
            self.work_dir if cfg.save_train_video else None,
            channels=obs_spec.shape[0] // cfg.frame_stack)

    @property
    def global_step(self) -> int:
        """Agent steps taken so far."""
        return self._global_step

    @property
    def global_episode(self) -> int:
        """Training episodes finished so far."""
        return self._global_episode

    @property
    def global_frame(self) -> int:
        """Environment frames seen so far (agent steps times action repeat)."""
        return self.global_step * self.cfg.action_repeat

    @property
    def replay_ready(self) -> bool:
        """Whether the replay holds at least one complete transition to sample."""
        if self.mode == 'none':
            # The disk loader only sees finished episodes.
            return len(self.replay_storage) > 0
        return self.replay_storage.can_sample

    @property
    def replay_iter(self):
        """Batch iterator, created on first use so that loader workers start after data exists."""
        if self._replay_iter is None:
            if self.mode == 'none':
                self._replay_iter = iter(self.replay_loader)
            else:
                from replay_buffer import Prefetcher
                self._replay_iter = Prefetcher(self.replay_storage, self.device, pending=self._prefetched)
                self._prefetched = None
        return self._replay_iter

    def eval(self) -> None:
        """Run num_eval_episodes with the policy mean and log the average return."""
        episodes = self.cfg.num_eval_episodes
        if episodes < 1:
            return
        print(f'evaluating {episodes} episode{"s" * (episodes != 1)} at frame {self.global_frame}', flush=True)
        step, total_reward = 0, 0.0
        # A bar per episode on a terminal (disable=None: none in log files).
        for episode in tqdm(range(episodes), desc='eval', unit='episode', leave=False, disable=None):
            time_step = self.eval_env.reset()
            self.video_recorder.init(self.eval_env, enabled=(episode == 0))
            while not time_step.last():
                with torch.no_grad(), utils.eval_mode(self.agent):
                    action = self.agent.act(time_step.observation, self.global_step, eval_mode=True)
                time_step = self.eval_env.step(action)
                self.video_recorder.record(self.eval_env)
                total_reward += float(time_step.reward)
                step += 1
            self.video_recorder.save(f'{self.global_frame}.mp4')

        with self.logger.log_and_dump_ctx(self.global_frame, ty='eval') as log:
            log('episode_reward', total_reward / episodes)
            log('episode_length', step * self.cfg.action_repeat / episodes)
            log('episode', self.global_episode)
            log('step', self.global_step)
            log('total_time', self.timer.total_time())

    def train(self) -> None:
        """Collect experience and update the agent until the first episode end at or after num_train_frames."""
        cfg = self.cfg
        train_until_step = utils.Until(cfg.num_train_frames, cfg.action_repeat)
        seed_until_step = utils.Until(cfg.num_seed_frames, cfg.action_repeat)
        eval_every_step = utils.Every(cfg.eval_every_frames, cfg.action_repeat)

        if not train_until_step(self.global_step):
            return  # nothing left to train (resumed from the final snapshot)
        if seed_until_step(self.global_step):
            print(f'collecting {cfg.num_seed_frames} seed frames before the first update', flush=True)
        updating = False
        episode_step, episode_reward = 0, 0.0
        time_step = self.train_env.reset()
        self.replay_storage.add(time_step)
        self.train_video_recorder.init(time_step.observation)
        while True:
            if time_step.last():
                self._global_episode += 1
                self.train_video_recorder.save(f'{self.global_frame}.mp4')
                elapsed_time, total_time = self.timer.reset()
                episode_frame = episode_step * cfg.action_repeat
                with self.logger.log_and_dump_ctx(self.global_frame, ty='train') as log:
                    log('fps', episode_frame / elapsed_time)
                    log('total_time', total_time)
                    log('episode_reward', episode_reward)
                    log('episode_length', episode_frame)
                    log('episode', self.global_episode)
                    log('buffer_size', len(self.replay_storage))
                    log('buffer_bytes', self.replay_storage.nbytes)
                    log('buffer_bytes_per_step', self.replay_storage.bytes_per_step)
                    log('step', self.global_step)

                # Training ends and snapshots are taken only here, between episodes: every logged episode is
                # complete, and a resumed run starts a new episode just as the uninterrupted run does next.
                done = not train_until_step(self.global_step)
                if cfg.save_snapshot and (done or self.global_frame - self._snapshot_frame
                                          >= cfg.snapshot_every_frames):
                    self.save_snapshot()
                if done:
                    break
                time_step = self.train_env.reset()
                self.replay_storage.add(time_step)
                self.train_video_recorder.init(time_step.observation)
                episode_step, episode_reward = 0, 0.0

            if eval_every_step(self.global_step):
                self.eval()

            with torch.no_grad(), utils.eval_mode(self.agent):
                action = self.agent.act(time_step.observation, self.global_step, eval_mode=False)

            # Seed frames only collect data; the agent explores uniformly for num_expl_steps anyway.
            if not seed_until_step(self.global_step) and self.replay_ready:
                if not updating:
                    print(f'updating the agent from frame {self.global_frame}', flush=True)
                    updating = True
                metrics = self.agent.update(self.replay_iter, self.global_step)
                self.logger.log_metrics(metrics, self.global_frame, ty='train')

            time_step = self.train_env.step(action)
            episode_reward += float(time_step.reward)
            self.replay_storage.add(time_step)
            self.train_video_recorder.record(time_step.observation)
            episode_step += 1
            self._global_step += 1

    def _env_generators(self) -> list:
        return [env.task.random for env in (self.train_env, self.eval_env)]

    def _prefetched_batch(self) -> dict:
        """The in-RAM replay's batch drawn for the next update and not used yet ({} if none)."""
        if self.mode == 'none':
            return {}  # the disk loader's workers draw on their own schedule: not reproducible
        if self._replay_iter is None:
            return self._prefetched or {}
        return self._replay_iter.state_dict()

    def save_snapshot(self) -> None:
        """Atomically write agent, optimizers, counters, logs' state, RNG states and replay to snapshot.pt."""
        # The drawn-ahead batch first: the buffer's sampler state is the one after drawing it.
        prefetched = self._prefetched_batch()
        snapshot.save(self.snapshot_path, self.cfg, {
            'global_step': self._global_step, 'global_episode': self._global_episode,
            'timer': self.timer.state_dict(), 'logger': self.logger.state_dict(),
            'agent': self.agent.state_dict(), 'rng': snapshot.rng_state(self._env_generators()),
            'replay': snapshot.to_tensors(self.replay_storage.state_dict()),
            'prefetched': snapshot.to_tensors(prefetched)})
        self._snapshot_frame = self.global_frame

    @contextlib.contextmanager
    def _snapshot_errors(self) -> Iterator[None]:
        """Turn an error restoring the snapshot's contents into a SnapshotError naming the file."""
        try:
            yield
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise snapshot.SnapshotError(f'cannot resume from {self.snapshot_path}: {error!r}') from error

    def restore(self, state: dict) -> None:
        """Continue from a snapshot's state (see save_snapshot); SnapshotError if it does not fit this run."""
        with self._snapshot_errors():
            self.agent.load_state_dict(state['agent'])
            if self.mode != 'none':  # none's storage took its state in setup
                self.replay_storage.load_state_dict(snapshot.to_arrays(state['replay']))
                self._prefetched = snapshot.to_arrays(state['prefetched'])
            self.timer.load_state_dict(state['timer'])
            snapshot.set_rng_state(state['rng'], self._env_generators())
            self._global_step, self._global_episode = state['global_step'], state['global_episode']
        self._snapshot_frame = self.global_frame
        print(f'resuming from {self.snapshot_path} at frame {self.global_frame} (step {self.global_step}, '
              f'episode {self.global_episode}) with {len(self.replay_storage)} steps in the replay buffer')

    def close(self) -> None:
        """Stop replay workers/threads and flush logs (matters for multirun in one process)."""
        # The in-RAM prefetcher's close() stops its sampling thread; dropping the DataLoader iterator
        # shuts its workers down.
        close = getattr(self._replay_iter, 'close', None)
        if close is not None:
            close()
        self._replay_iter = None
        self.logger.close()


@hydra.main(config_path='cfgs', config_name='config', version_base=None)
def main(cfg: DictConfig) -> None:
    """Check the config, build the workspace (resuming from snapshot.pt if the run dir has one), and train."""
    validate_config(cfg)
    workspace = Workspace(cfg)
    try:
        workspace.train()
    finally:
        workspace.close()


if __name__ == '__main__':
    main()
