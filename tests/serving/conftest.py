"""Fixtures the serving tests share."""

import pytest

from unet_export.errors import UserError
from unet_export.serving import install


@pytest.fixture(scope="module")
def tritonserver():
    """The bundled tritonserver (fetched into the cache on first use); skipped, with the reason,
    only where the package registry cannot be reached."""
    try:
        return install.locate_tritonserver()
    except UserError as exc:
        if "cannot fetch" in str(exc):
            pytest.skip(str(exc))
        raise
