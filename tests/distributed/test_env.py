"""The process's place in the job, from torchrun's variables or SLURM's; SLURM node lists are
expanded as SLURM does."""

from __future__ import annotations

import pytest

from pretrain.distributed import first_host, read_env, slurm_port


@pytest.mark.parametrize("nodelist,first", [
    ("node[01-02]-ib", "node01-ib"),          # a suffix after the brackets
    ("r[1-2]n[01-04]", "r1n01"),              # several bracket groups
    ("gpu[003-005,009],cpu1", "gpu003"),      # zero padding, ranges and lists, commas
    ("gpu[009,003-005]", "gpu009"),           # SLURM keeps the order given
    ("cn-12", "cn-12"),
    ("login1,compute[7-8]", "login1"),
    ("a100-[0-1]x", "a100-0x"),
])
def test_slurm_node_lists_expand_like_slurm(nodelist, first):
    assert first_host(nodelist) == first


def test_a_malformed_node_list_is_named():
    with pytest.raises(ValueError, match=r"cannot expand SLURM node list 'node\[01-'"):
        first_host("node[01-")


def test_slurm_variables_give_rank_world_and_rendezvous():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "r[1-2]n[01-02]"}
    dist = read_env(env)
    assert (dist.rank, dist.world_size, dist.local_rank) == (5, 8, 1)
    assert dist.master_addr == "r1n01" and dist.master_port == slurm_port(123456) == 20000 + 123456 % 20000
    # What the sbatch template exports wins.
    dist = read_env({**env, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29511"})
    assert (dist.master_addr, dist.master_port) == ("10.0.0.7", 29511)
    # torchrun's variables come first.
    dist = read_env({**env, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (dist.rank, dist.world_size, dist.master_addr) == (0, 2, "h")
