"""Several processes (hosts): joining JAX's distributed runtime, and stopping together.

One process per host runs the same command; `initialize` joins them through
`jax.distributed.initialize` (a coordinator service in process 0, heartbeats,
and Gloo collectives between CPU processes), after which `jax.devices()` are
the devices of all processes and the train step's collectives span them.

Stopping must be collective too: an orbax save is, so a process that saved
alone because it got SIGTERM would leave the others waiting in a collective
that never completes. `Agreement` makes the processes agree on whether any of
them was asked to stop, every ``distributed.stop_check_every_steps`` steps,
with one tiny all-reduce; they then stop at the same step and save one
checkpoint together.

A process that dies would leave the others blocked in a collective; JAX
detects it but then aborts them with C++ fatal logs. `_Watchdog` ends them
first, each with one line.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
import time

import jax
import numpy as np

from allconv_jax import config as config_lib
from allconv_jax.errors import UserError


def wanted(config) -> bool:
  """Whether the config asks for several processes."""
  dist = config.get('distributed')
  return dist is not None and bool(dist.initialize or dist.coordinator_address)


def initialize(config) -> None:
  """Joins a multi-process (multi-host) run when the config or environment asks.

  Must run before JAX does any computation. With
  ``config.distributed.initialize`` true, or a coordinator address in the
  config, `jax.distributed.initialize` is called with the fields that are set;
  fields left unset are detected by JAX from cluster environments (SLURM, Open
  MPI, Cloud TPU, ...). With neither, a single process runs on its local
  devices.

  Processes that have not all joined within
  ``distributed.initialization_timeout`` seconds end with one line and exit
  status 2 (JAX would abort with a C++ fatal log). Once joined, a watchdog
  (`_Watchdog`) ends this process with one line if another one dies.

  Raises:
    UserError: for inconsistent fields, processes that disagree on their
      number, or another error of `jax.distributed.initialize`.
  """
  if not wanted(config):
    return
  config_lib.validate_distributed(config)
  dist = config.distributed
  kwargs = {name: dist[name] for name in
            ('coordinator_address', 'num_processes', 'process_id')
            if dist[name] is not None}
  # The stop is agreed by `Agreement`; JAX's preemption service would take
  # SIGTERM for itself and swallow one that arrives before training starts.
  jax.config.update('jax_enable_preemption_service', False)
  # JAX's client aborts the process (a C++ fatal log) when the others do not
  # join in time, so this timer ends it first, with one line; JAX's own
  # timeout is only a backstop.
  timer = threading.Timer(dist.initialization_timeout, _not_joined, (dist,))
  timer.daemon = True
  timer.start()
  try:
    jax.distributed.initialize(
        **kwargs, initialization_timeout=2 * dist.initialization_timeout + 10,
        heartbeat_timeout_seconds=2 * dist.heartbeat_timeout)
  except Exception as e:  # pylint: disable=broad-except
    raise _translate(e, dist) from None
  finally:
    timer.cancel()
  if jax.process_count() > 1:
    _start_watchdog(dist.heartbeat_timeout)
  if dist.num_processes is not None and jax.process_count() != dist.num_processes:
    raise UserError(
        f'distributed.num_processes: {dist.num_processes} here, but the '
        f'coordinator was started for {jax.process_count()}; give every '
        'process the same num_processes')
  if jax.process_count() > 1:
    _connect_collectives()


def _connect_collectives() -> None:
  """Runs the run's kinds of collective once, while the processes are in step.

  Gloo connects the processes of a collective the first time it runs, and
  gives up if one of them is more than 30 s late (fixed in jaxlib 0.10.2).
  Later, processes can be further apart than that at a first use: one
  compiles a step for longer, or loads data more slowly. Connected here, just
  after `jax.distributed.initialize` has brought them together, the later
  collectives reuse these connections and wait for as long as it takes.
  """
  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils
  Agreement(1)(0, None)  # The train step's kind: over every device.
  multihost_utils.sync_global_devices('allconv_jax: connect')  # Orbax's kind.


class _Watchdog(threading.Thread):
  """Ends this process with one line when another process stops answering.

  Each process bumps a counter in the coordinator's key-value store every
  second and reads the others'; a counter that has not moved for
  ``heartbeat_timeout`` seconds is a dead (or frozen) process. The main
  thread may then be blocked in a collective that can never complete, so
  nothing can be raised there: the line is printed and the process ends at
  once, with status 1 (a restart of every process resumes from the last
  checkpoint; the command is fine). A checkpoint being written is not
  committed, so the resumed run ignores it.

  Why not JAX's own heartbeats: when they time out, JAX's client aborts the
  process with a C++ fatal log and stack dumps, and the hook it has for this
  (``missed_heartbeat_callback``) crashes in jaxlib 0.10.2 (its status
  argument has no Python type). So JAX's timeout is set to twice this one,
  as a backstop.
  """

  PREFIX = 'allconv/alive/'

  def __init__(self, client, timeout: int):
    super().__init__(name='allconv-distributed-watchdog', daemon=True)
    self.client, self.timeout = client, timeout
    self.key = f'{self.PREFIX}{jax.process_index()}'
    self.stopping = threading.Event()

  def run(self):
    seen = {}  # process -> (counter, when it last moved)
    beat = 0
    while not self.stopping.wait(min(1.0, self.timeout / 5)):
      beat += 1
      try:
        self.client.key_value_set(self.key, str(beat), allow_overwrite=True)
        counters = dict(self.client.key_value_dir_get(self.PREFIX))
      except Exception as e:  # pylint: disable=broad-except
        if self.stopping.is_set():
          return
        _lost(f'the coordinator (process 0) does not answer: '
              f'{str(e).splitlines()[0][:120] if str(e) else type(e).__name__}')
        return
      now = time.monotonic()
      for key, counter in counters.items():
        if key == self.key or counter == _DONE:
          continue
        if counter.startswith(_FAILED):
          # Usually every process fails alike (a config error) and ends on
          # its own line; only a process left waiting for the failed one
          # still runs after a grace period.
          if self.stopping.wait(_GRACE_SECONDS):
            return
          status, _, why = counter[len(_FAILED):].partition(':')
          why = f': {why}' if why else ' (its own error line says why)'
          _lost(f'process {key[len(self.PREFIX):]} ended with exit status '
                f'{status}{why}', 2 if status == '2' else 1, self)
        if seen.get(key, (None,))[0] != counter:
          seen[key] = (counter, now)
        elif now - seen[key][1] > self.timeout:
          _lost(f'process {key[len(self.PREFIX):]} sent no heartbeat for '
                f'{self.timeout} s (distributed.heartbeat_timeout)')

  def leave(self):
    """Tells the others that this process is leaving, and how.

    After an error this process ends here, without JAX's shutdown, whose
    barrier would wait for processes that may be blocked waiting for this
    one; process 0, whose exit takes the coordinator down, first gives the
    others a few seconds to end on their own lines.
    """
    self.stopping.set()
    status = _exit_status
    if status is None and getattr(sys, 'last_value', None) is not None:
      status = 1  # An uncaught exception.
    failed = status not in (None, 0) and status <= 128
    try:
      self.client.key_value_set(
          self.key, f'{_FAILED}{status}:{_exit_line}' if failed else _DONE,
          allow_overwrite=True)
      if failed and jax.process_index() == 0:
        # Longer than the others' grace, so that they end on their lines
        # (they say when they have: see `run`), even on a busy machine.
        deadline = time.monotonic() + _GRACE_SECONDS + 10
        while time.monotonic() < deadline and any(
            v != _DONE and not v.startswith(_FAILED)
            for _, v in self.client.key_value_dir_get(self.PREFIX)):
          time.sleep(0.1)
    except Exception:  # pylint: disable=broad-except
      pass  # The coordinator is gone; there is no one left to tell.
    if failed:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(status)  # pylint: disable=protected-access


_DONE = 'done'
_FAILED = 'failed:'
_GRACE_SECONDS = 3
_exit_status = None
_exit_line = ''


def exiting(status: int, line: str = '') -> None:
  """Records the exit status this process is about to end with, and its line.

  Other processes are told when it leaves: after an error they stop too
  (they may be waiting for this one in a collective), each with a line that
  quotes this one's (a full disk that only process 0 writes to, say); after
  a success or an agreed interruption (128 + signal) they go on.
  """
  global _exit_status, _exit_line
  _exit_status = status
  _exit_line = line.removeprefix('error: ').splitlines()[0][:1000] if line else ''


_watchdog = None
_ending = threading.Lock()


def end_now(line: str, status: int) -> None:
  """Ends this process of a multi-process run at once, from any thread,
  with `line`, telling the others (which then end with a line quoting it).

  For an error met by a background thread while the main thread waits for
  the other processes: a checkpoint write that failed on this process only
  (a full disk) leaves orbax's threads on every process waiting at
  barriers for up to 20 minutes. With a single process it does nothing: the
  error reaches the main thread.
  """
  if _watchdog is None:
    return
  if not _ending.acquire(blocking=False):
    threading.Event().wait()  # Another thread is ending the process.
  print(line, file=sys.stderr, flush=True)
  exiting(status, line)
  _watchdog.leave()


def failure_line(error: Exception) -> str | None:
  """The one line for a collective between processes that failed, or None.

  None for a single process, and for any other error: those stay tracebacks.
  """
  if jax.process_count() == 1 or not isinstance(error, jax.errors.JaxRuntimeError):
    return None
  cause = next((l.strip() for l in str(error).splitlines() if l.strip()), '')
  return (f'error: distributed: a collective between the processes failed '
          f'({cause[:200]}); restart every process with the same command to '
          'resume from the last checkpoint')


def _lost(cause: str, status: int = 1, watchdog=None) -> None:
  then = ('fix what it says and start every process again' if status == 2 else
          'restart every process with the same command to resume from the '
          'last checkpoint')
  print(f'error: distributed: {cause}; {then}', file=sys.stderr, flush=True)
  if watchdog is not None:  # Process 0 waits for this before it ends.
    try:
      watchdog.client.key_value_set(watchdog.key, f'{_FAILED}{status}',
                                    allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass
  os._exit(status)  # pylint: disable=protected-access


def _start_watchdog(timeout: int) -> None:
  # pylint: disable=g-import-not-at-top,protected-access
  from jax._src import distributed as jax_distributed
  global _watchdog
  watchdog = _watchdog = _Watchdog(jax_distributed.global_state.client, timeout)
  watchdog.start()
  # Registered after JAX's own shutdown (at its import), so run before it.
  atexit.register(watchdog.leave)


def _not_joined(dist) -> None:
  where = dist.coordinator_address or 'the detected coordinator'
  print(f'error: distributed.coordinator_address: not all '
        f'{dist.num_processes or ""} processes joined at {where} within '
        f'{dist.initialization_timeout} s (distributed.initialization_timeout); '
        'start every process with the same coordinator_address and '
        'num_processes, process 0 on the host of that address',
        file=sys.stderr, flush=True)
  os._exit(2)  # pylint: disable=protected-access


def _translate(error: Exception, dist) -> UserError:
  """One line for an error `jax.distributed.initialize` raised (not aborted on)."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  where = dist.coordinator_address or 'the detected coordinator'
  return UserError(f'distributed: could not join the processes at {where} '
                   f'({(lines[0] if lines else type(error).__name__)[:200]})')


class Agreement:
  """Whether any process was asked to stop, agreed by all of them.

  The processes run the same loop over the same steps, so each reaches a
  check at the same step; there they all-reduce their local requests, and all
  of them see the same answer. Between checks a local request waits, so no
  process ever saves or stops alone.
  """

  def __init__(self, every: int):
    self.every = every
    self._next = None
    self._step = None
    self._agreed = None

  def __call__(self, step: int, signum: int | None) -> int | None:
    """The agreed signal at `step` (None: go on); the same on every process."""
    if step == self._step:
      return self._agreed
    if self._next is None:
      self._next = step
    if step < self._next:
      return None
    self._next = step + self.every
    sharding, largest = _agreement_program()
    mine = np.full((jax.local_device_count(),), signum or 0, np.int32)
    agreed = int(largest(jax.make_array_from_process_local_data(
        sharding, mine, (jax.device_count(),))))
    self._step, self._agreed = step, agreed or None
    return self._agreed


@functools.cache
def _agreement_program():
  """The sharding of one integer per device, and their jitted maximum.

  One program for the whole run, compiled (and its connections made) by
  `_connect_collectives`.
  """
  mesh = jax.make_mesh((jax.device_count(),), ('processes',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  spec = jax.sharding.PartitionSpec
  largest = jax.jit(lambda x: x.max(),
                    out_shardings=jax.sharding.NamedSharding(mesh, spec()))
  return jax.sharding.NamedSharding(mesh, spec('processes')), largest
