"""The runtime image the docker sandbox tests run, built from this tree.

It is built once per test session from ``Dockerfile.runtime`` on the base
image ``CONVEYOR_TEST_DOCKER_BASE`` names (by default the Debian image that
``.ci/run`` imports from a debootstrap tree, since no registry is reachable
there), so the containers run the bootstrap of the code under test.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = os.environ.get("CONVEYOR_TEST_DOCKER_BASE", "conveyor-base:bookworm")
TEST_IMAGE = "conveyor-runtime:test"


@functools.cache
def runtime_image() -> tuple[str, str | None]:
    """The tag of the built image and None, or "" and why it cannot be built."""
    try:
        import docker
        from docker.errors import BuildError, DockerException, ImageNotFound
    except ImportError:
        return "", "the docker SDK is not installed"

    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except DockerException as exc:
        return "", f"no docker daemon answers ({exc})"
    try:
        client.images.get(BASE_IMAGE)
        client.images.build(
            path=str(ROOT),
            dockerfile="Dockerfile.runtime",
            tag=TEST_IMAGE,
            buildargs={"BASE_IMAGE": BASE_IMAGE},
            network_mode="host",
            rm=True,
            forcerm=True,
        )
    except ImageNotFound:
        return "", (
            f"the base image {BASE_IMAGE} is not there; .ci/run makes it, or "
            "set CONVEYOR_TEST_DOCKER_BASE to an image with python3 and venv"
        )
    except (BuildError, DockerException) as exc:
        return "", f"building {TEST_IMAGE} from Dockerfile.runtime failed: {exc}"
    finally:
        client.close()
    return TEST_IMAGE, None
