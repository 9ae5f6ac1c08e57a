"""Fixtures the adversarial trunk tests share: a served trunk and its clients."""

from __future__ import annotations

import pytest

from tests.test_trunk_service import connecting, serving

serve = pytest.fixture(name="serve")(serving)
clients = pytest.fixture(name="clients")(connecting)
