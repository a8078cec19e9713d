"""pyproject.toml declares ranges; requirements.lock pins the tested set.

The library must install beside a user's stack, so pyproject.toml declares the
range each dependency works in rather than one exact version, and the exact
set that `make test` and CI install (and that was tested) is the lock file.
These checks read files and installed metadata only (no JAX): every
dependency of the package and of its test extra is pinned in the lock, inside
its declared range; the lock holds the whole tree of what those need, and
nothing else; and the environment running the tests is the lock's.
"""

import importlib.metadata
import pathlib
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCK = ROOT / 'requirements.lock'
# Compiled against these headers (allconv_jax/onednn_conv.cc): exact pins.
EXACT = {'onednn-cpu-gomp', 'onednn-devel-cpu-gomp'}
# The stack a user is most likely to have already: bounded on both sides.
CORE = {'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint'}
# Installed by `python -m venv`/pip itself; `pip freeze` leaves them out.
TOOLS = {'pip', 'setuptools', 'wheel'}


def _project() -> dict:
  return tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']


def _applies(req: Requirement, extra: str = '') -> bool:
  """Whether `req` is for this Python and platform (the lock's)."""
  return req.marker is None or req.marker.evaluate({'extra': extra})


def _declared() -> list[Requirement]:
  """The package's dependencies and its test extra's (what `make` installs)."""
  project = _project()
  reqs = [Requirement(r) for r in project['dependencies']]
  reqs += [Requirement(r) for r in project['optional-dependencies']['test']]
  return [r for r in reqs if _applies(r)]


def _lock() -> dict[str, str]:
  """Canonical name -> version of every pin in the lock that applies here."""
  pins = {}
  for number, line in enumerate(LOCK.read_text().splitlines(), 1):
    line = line.split('#', 1)[0].strip()
    if not line:
      continue
    req = Requirement(line)
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == '==', (
        f'{LOCK.name}:{number}: not an exact pin: {line}')
    name = canonicalize_name(req.name)
    assert name not in pins, f'{LOCK.name}:{number}: {name} pinned twice'
    if _applies(req):
      pins[name] = specs[0].version
  return pins


def test_dependencies_are_ranges_not_pins():
  project = _project()
  reqs = [Requirement(r) for r in project['dependencies']]
  for extra in project['optional-dependencies'].values():
    reqs += [Requirement(r) for r in extra]
  for req in reqs:
    name = canonicalize_name(req.name)
    operators = {s.operator for s in req.specifier}
    if name in EXACT:
      continue
    assert not operators & {'==', '==='}, (
        f'pyproject.toml pins {req} exactly: declare the range it works in '
        f'(the exact tested version goes into {LOCK.name})')
    if name in CORE:
      assert '>=' in operators and '<' in operators, (
          f'{req}: give the range known to work, lower and upper bound')


def test_jax_range_is_the_same_everywhere():
  """The cuda extras' jax may not admit a jax that the library does not."""
  project = _project()
  ranges = {str(r.specifier) for r in map(Requirement, project['dependencies'])
            if r.name in ('jax', 'jaxlib')}
  for extra in ('cuda12', 'cuda13'):
    ranges |= {str(r.specifier) for r in map(
        Requirement, project['optional-dependencies'][extra])}
  assert len(ranges) == 1, f'jax, jaxlib and jax[cuda*] ranges differ: {ranges}'


def test_lock_pins_every_dependency_inside_its_range():
  pins = _lock()
  for req in _declared():
    name = canonicalize_name(req.name)
    assert name in pins, f'{req.name} ({req}) is missing from {LOCK.name}'
    assert req.specifier.contains(pins[name], prereleases=True), (
        f'{LOCK.name} pins {name}=={pins[name]}, outside pyproject.toml\'s '
        f'{req}')


def test_lock_is_exactly_the_installed_tree():
  """The lock is closed (every requirement of a locked package is locked, in
  its range) and holds nothing that the package and its tests do not pull in;
  the environment running this is the lock's (as `make test` installs it)."""
  pins = _lock()
  seen: dict[str, set[str]] = {}  # Name -> extras followed.
  todo = [(r, '(pyproject.toml)') for r in _declared()]
  problems = []
  while todo:
    req, needed_by = todo.pop()
    name = canonicalize_name(req.name)
    if name in TOOLS:
      continue
    if name not in pins:
      problems.append(f'{name} (needed by {needed_by}: {req}) is not locked')
      continue
    if not req.specifier.contains(pins[name], prereleases=True):
      problems.append(f'{name}=={pins[name]} does not satisfy {needed_by}\'s '
                      f'{req}')
    extras = {''} | set(req.extras)
    if name in seen and extras <= seen[name]:
      continue
    new = extras - seen.get(name, set())
    seen.setdefault(name, set()).update(extras)
    try:
      installed = importlib.metadata.version(name)
      requires = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
      problems.append(f'{name} is locked but not installed here')
      continue
    if installed != pins[name]:
      problems.append(f'{name} {installed} is installed, the lock has '
                      f'{pins[name]}')
    for line in requires:
      dep = Requirement(line)
      if any(_applies(dep, extra) for extra in new):
        todo.append((dep, name))
  unused = sorted(set(pins) - set(seen))
  if unused:
    problems.append(f'locked but needed by nothing: {", ".join(unused)}')
  assert not problems, '\n'.join(problems)
