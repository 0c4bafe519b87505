"""medmesh: the shared runtime, the launcher, and (under build/gen/python) the generated protos.

The generated modules (`medmesh.<svc>.v1`) live in another directory on sys.path;
extend_path lets this package span both.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
