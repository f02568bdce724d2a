"""The SLURM cluster the launch tests submit to: installed and started once per
session, torn down at its end whatever the tests did. A cluster that cannot be
installed or started fails the tests that need it, with the reason; it never
skips them."""

import pytest

from tests.launch import slurm_cluster


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    try:
        cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    except slurm_cluster.SlurmSetupError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield cluster
    slurm_cluster.stop(cluster)
