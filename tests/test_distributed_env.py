"""Environment resolution for each launcher, and the errors for half-set environments."""
import pytest

from runtime.distributed import DistEnvError, first_host, resolve_env

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[007-010,12]",
         "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0"}


def test_single_process():
    env = resolve_env({})
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (0, 0, 1, "single") and env.is_main


def test_torchrun():
    env = resolve_env(TORCHRUN)
    assert (env.rank, env.local_rank, env.world_size) == (3, 1, 4)
    assert (env.master_addr, env.master_port, env.launcher) == ("10.0.0.1", 29400, "torchrun")
    assert not env.is_main


def test_torchrun_inside_slurm_allocation_wins():
    assert resolve_env({**SLURM, **TORCHRUN}).launcher == "torchrun"


def test_slurm():
    env = resolve_env(SLURM)
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (5, 1, 8, "slurm")
    assert env.master_addr == "gpu007"
    assert env.master_port == 20000 + 123456 % 20000
    # an explicit MASTER_ADDR/PORT (exported by the job script) is used as is, and is not a half-set torchrun env
    env = resolve_env({**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert (env.master_addr, env.master_port, env.launcher) == ("head", 1234, "slurm")


def test_sbatch_script_itself_is_one_process():
    # the batch step sets SLURM_PROCID/SLURM_LOCALID but is no srun step (no SLURM_STEP_ID, maybe no SLURM_NTASKS)
    env = resolve_env({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "7"})
    assert env.launcher == "single" and env.world_size == 1


@pytest.mark.parametrize("nodelist,host", [("node1", "node1"), ("a[01-04]", "a01"), ("gpu[3,5-9],cpu1", "gpu3"),
                                           ("x-1,x-2", "x-1")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("drop", ["LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"])
def test_half_set_torchrun_is_an_error(drop):
    env = {k: v for k, v in TORCHRUN.items() if k != drop}
    with pytest.raises(DistEnvError, match=f"half-set torchrun environment: .* {drop} missing"):
        resolve_env(env)


def test_rank_without_anything_else():
    with pytest.raises(DistEnvError, match="LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT missing"):
        resolve_env({"RANK": "0"})


@pytest.mark.parametrize("drop", ["SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST"])
def test_half_set_slurm_is_an_error(drop):
    env = {k: v for k, v in SLURM.items() if k != drop}
    with pytest.raises(DistEnvError, match=f"half-set Slurm environment: .*{drop}"):
        resolve_env(env)


def test_inconsistent_values():
    with pytest.raises(DistEnvError, match="rank 4 .* world size 4"):
        resolve_env({**TORCHRUN, "RANK": "4"})
    with pytest.raises(DistEnvError, match="WORLD_SIZE='two' is not an integer"):
        resolve_env({**TORCHRUN, "WORLD_SIZE": "two"})
