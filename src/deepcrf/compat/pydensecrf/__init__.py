"""pydensecrf-compatible API on deepcrf's lattice: a drop-in for ``pydensecrf``.

Replace ``import pydensecrf.densecrf as dcrf`` with
``import deepcrf.compat.pydensecrf.densecrf as dcrf`` (and ``pydensecrf.utils`` with
``deepcrf.compat.pydensecrf.utils``); ``from deepcrf.compat import pydensecrf`` gives the
package, with ``pydensecrf.densecrf`` and ``pydensecrf.utils`` as attributes.  See
docs/densecrf.md for the conventions and the measured agreement with pydensecrf.
"""

from __future__ import annotations

from . import densecrf, eigen, utils

__all__ = ["densecrf", "eigen", "utils"]
