"""CPU memory settings (preftune/memory.py): glibc's malloc, the restart that turns its tcache off,
and releasing the file pages of weights cast to another dtype. Their effect on speed and peak RSS
is measured by benchmarks/dpo_vs_trl.py, not here."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from preftune.memory import configure_cpu_malloc, file_mappings, release_file_pages
from preftune.models.embedding import SeenRowsEmbedding

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc / Linux only")

SHOW_ENV = (
    "import os, sys\n"
    "from preftune.memory import restart_with_malloc_tunables\n"
    "print('started', flush=True)\n"
    "restart_with_malloc_tunables()\n"
    "print(os.environ.get('GLIBC_TUNABLES'), os.environ.get('PREFTUNE_MALLOC_RESTARTED'), sys.argv[1:])\n"
)


def _run(env_extra: dict) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PREFTUNE_MALLOC_RESTARTED")}
    out = subprocess.run(
        [sys.executable, "-c", SHOW_ENV, "a", "--b"],
        env={**env, **env_extra},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines()


@linux_only
@pytest.mark.parametrize("low_memory", [False, True])
def test_cpu_malloc_settings_are_accepted(low_memory):
    assert configure_cpu_malloc(low_memory=low_memory)


@linux_only
def test_restart_turns_the_tcache_off_once_and_keeps_the_arguments():
    lines = _run({"GLIBC_TUNABLES": "glibc.malloc.arena_test=2"})
    # the script ran twice (before and after the restart), the second time with the tunable added
    assert lines == [
        "started",
        "started",
        "glibc.malloc.arena_test=2:glibc.malloc.tcache_count=0 1 ['a', '--b']",
    ]


@linux_only
def test_restart_keeps_a_users_own_tcache_setting():
    lines = _run({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"})
    assert lines == ["started", "glibc.malloc.tcache_count=7 None ['a', '--b']"]


def _resident_kib(path: str) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split(maxsplit=1)[0]:
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@linux_only
def test_release_file_pages_drops_a_mapped_tensor_from_the_resident_set(tmp_path):
    path = tmp_path / "weights.bin"
    values = np.arange(4 * 1024 * 1024, dtype=np.float32)  # 16 MiB
    values.tofile(path)
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="r"))
    anonymous = torch.from_numpy(values.copy())
    assert torch.equal(mapped, torch.from_numpy(values))  # every page read
    before = _resident_kib(str(path))
    assert before >= 15 * 1024
    released = release_file_pages([mapped, anonymous])  # the anonymous copy is left alone
    assert released >= 15 * 1024 * 1024
    assert _resident_kib(str(path)) < before - 15 * 1024
    assert torch.equal(mapped, torch.from_numpy(values))  # read again from the file
    assert torch.equal(anonymous, torch.from_numpy(values))


def test_frozen_linear_weights_in_bf16_keep_their_values(tmp_path):
    """bf16 storage of the frozen base (loaded as views of the safetensors file, whose pages are
    released after each cast): every linear weight is the original rounded to bf16, the tied LM
    head gets its own bf16 copy, the embedding and the LoRA weights stay fp32 and exact."""
    from conftest import make_tiny_llama
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from preftune.models.prepare import store_frozen_linear_weights

    make_tiny_llama(64).save_pretrained(tmp_path, safe_serialization=True)
    original = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tmp_path).state_dict().items()}
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32),
        LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0),
    )
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert store_frozen_linear_weights(model, torch.bfloat16) == 2 * 7 + 1
    base = model.get_base_model()
    embedding = original["model.embed_tokens.weight"]
    assert base.lm_head.weight.dtype == torch.bfloat16 and not base.lm_head.weight.requires_grad
    assert torch.equal(base.lm_head.weight, embedding.to(torch.bfloat16))  # what autocast computes with
    assert base.get_input_embeddings().weight.dtype == torch.float32  # untied: lookups stay exact
    # ... and still read from the mapped file, keeping only copies of the rows lookups read
    assert isinstance(base.get_input_embeddings(), SeenRowsEmbedding)
    pointer = base.get_input_embeddings().weight.data_ptr()
    assert any(start <= pointer < end for start, end in file_mappings())
    ids = torch.tensor([[3, 5, 3, 60]])
    assert torch.equal(base.get_input_embeddings()(ids), embedding[ids])
    state = base.state_dict()
    for name, value in original.items():
        if name.endswith("proj.weight"):
            stored = state[name.replace(".weight", ".base_layer.weight")]
            assert stored.dtype == torch.bfloat16
            assert torch.equal(stored, value.to(torch.bfloat16)), name
        elif name != "lm_head.weight":
            assert state[name].dtype == torch.float32
            assert torch.equal(state[name], value), name
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.dtype == torch.float32 and torch.equal(param.detach(), lora[name])


def _resident_kib_of_mapping_at(pointer: int) -> int:
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields[0].endswith(":"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inside = start <= pointer < end
            elif inside and fields[0] == "Rss:":
                return int(fields[1])
    raise AssertionError("no mapping holds the pointer")


def test_seen_rows_embedding_looks_up_the_same_rows():
    """Lookups equal nn.Embedding's bit for bit, through the table's growth, repeats and a cast;
    each distinct token's row is copied once."""
    torch.manual_seed(0)
    source = torch.nn.Embedding(5000, 8)
    source.weight.requires_grad_(False)
    embedding = SeenRowsEmbedding(source)
    assert embedding.weight.data_ptr() == source.weight.data_ptr()  # the same weight, no copy
    seen = set()
    for length in (7, 700, 3000, 3000):
        ids = torch.randint(0, 5000, (2, length))
        assert torch.equal(embedding(ids), source(ids))
        seen |= set(ids.flatten().tolist())
        assert embedding._count == len(seen)
    embedding.double()
    ids = torch.randint(0, 5000, (3, 11))
    assert torch.equal(embedding(ids), source.weight.double()[ids])
    assert embedding._count == len(set(ids.flatten().tolist()))  # the cast started a new table


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_seen_rows_embedding_leaves_no_file_pages_mapped(tmp_path):
    """On a weight that is a view of a mapped file, the pages a lookup reads are unmapped again:
    the file adds nothing to the resident set, the copied rows are all a lookup keeps."""
    rows = np.random.default_rng(0).standard_normal((4096, 256), dtype=np.float32)  # 4 MiB
    rows.tofile(tmp_path / "table.bin")
    mapped = np.memmap(tmp_path / "table.bin", dtype=np.float32, mode="c", shape=rows.shape)
    source = torch.nn.Embedding.from_pretrained(torch.from_numpy(mapped), freeze=True)
    pointer = source.weight.data_ptr()
    embedding = SeenRowsEmbedding(source)
    assert _resident_kib_of_mapping_at(pointer) == 0
    ids = torch.tensor([[0, 1000, 2000, 3000, 4095]])
    assert torch.equal(embedding(ids), torch.from_numpy(rows)[ids])
    assert _resident_kib_of_mapping_at(pointer) == 0
    assert source(ids).shape == (1, 5, 256) and _resident_kib_of_mapping_at(pointer) > 0  # nn.Embedding


CACHE_ENV = (
    "import os\n"
    "from preftune.memory import restart_with_malloc_tunables\n"
    "restart_with_malloc_tunables()\n"
    "from preftune.memory import CPU_LIBRARY_ENV\n"
    "print(*(os.environ.get(name) for name in CPU_LIBRARY_ENV))\n"
)


@pytest.mark.parametrize("users", [None, "7"], ids=["default", "users-own"])
def test_the_kernel_caches_are_capped_unless_the_user_sets_them(users):
    """oneDNN's compiled-kernel caches are capped and MKL's buffer cache is off (in the restarted
    process too); a user's own setting is kept."""
    from preftune.memory import CPU_LIBRARY_ENV

    env = {k: v for k, v in os.environ.items() if k not in CPU_LIBRARY_ENV}
    if users:
        env.update({name: users for name in CPU_LIBRARY_ENV})
    out = subprocess.run(
        [sys.executable, "-c", CACHE_ENV], env=env, capture_output=True, text=True, check=True
    )
    expected = [users] * 3 if users else ["64", "16", "1"]
    assert out.stdout.split() == expected


@linux_only
def test_release_free_heap_returns_freed_pages():
    """Freed blocks below a live one stay resident until malloc_trim hands their pages back."""
    import ctypes

    from preftune.memory import release_free_heap

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(256)]  # 16 MiB below the heap's top
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    keep = libc.malloc(64 * 1024)  # pins the top
    for block in blocks:
        libc.free(block)
    before = _resident_kib("[heap]")
    assert release_free_heap()
    assert _resident_kib("[heap]") < before - 8 * 1024
    libc.free(keep)
