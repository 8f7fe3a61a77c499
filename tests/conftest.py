import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed on CPU JIT-builds its shared-memory op into TORCH_EXTENSIONS_DIR (~/.cache/torch_extensions) under a lock
# file: a run killed mid-build leaves the lock and every later DeepSpeed launch waits on it forever, and runs from other
# checkouts rebuild the same folder under each other. Each test run builds into a folder of its own (set here, before
# pytest-xdist starts its workers, so they and every launched process share it) and removes it when it ends.
OWN_EXTENSIONS_DIR = None
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    OWN_EXTENSIONS_DIR = os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="hf_kd-tests-torch-extensions-")
THREADS = 2  # torch threads per test
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n N: the cores shared out, for this process and its children
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)

import psutil  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    ViTConfig,
    ViTForImageClassification,
)

from hf_kd import DistillationConfig  # noqa: E402

VOCAB = 64


def tiny_bert(hidden=32, layers=2, num_labels=3, seed=0, heads=2):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        num_labels=num_labels,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def tiny_gpt2(hidden=32, layers=2, vocab=VOCAB, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,  # GPT-2's 50256 lies outside the tiny vocabulary
        eos_token_id=None,
    )
    return GPT2LMHeadModel(config)


def grouped_query_lm_config(config_class, hidden=32, layers=2):
    """A tiny config of a Llama-style LM (Llama, Qwen2, a Llava's text model): one key/value head, no bos/eos."""
    return config_class(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=None,
    )


def tiny_vit(hidden=32, layers=2, seed=0):
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def tiny_t5(width=16, layers=1, seed=0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=VOCAB,
            d_model=width,
            d_kv=8,
            d_ff=2 * width,
            num_layers=layers,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            dropout_rate=0.0,
        )
    )


def seq2seq_data(n=8, seed=0):
    """Encoder inputs of 7 tokens, targets of 1-5 tokens (-100 after)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 4, 2, 5, 1, 4, 3] * (n // 8 + 1)
    return Dataset.from_dict(
        {
            "input_ids": torch.randint(2, VOCAB, (n, 7), generator=generator).tolist(),
            "attention_mask": [[1] * 7] * n,
            "labels": [
                [int(t) for t in row[:k]] + [-100] * (5 - k)
                for row, k in zip(torch.randint(2, VOCAB, (n, 5), generator=generator), lengths)
            ],
        }
    )


def classification_data(n=32, length=8, num_labels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict(
        {
            "input_ids": torch.randint(0, VOCAB, (n, length), generator=generator).tolist(),
            "attention_mask": [[1] * length] * n,
            "labels": torch.randint(0, num_labels, (n,), generator=generator).tolist(),
        }
    )


def lm_data(n=16, length=10, seed=0, padded=True):
    """Causal-LM rows with prompt tokens masked, so rows carry uneven numbers of supervised tokens; rows also
    vary in length (right-padded) unless ``padded=False``."""
    generator = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for i in range(n):
        real = 4 + (i * 3) % (length - 3) if padded else length
        ids = torch.randint(1, VOCAB, (real,), generator=generator).tolist()
        prompt = 1 + i % 3
        rows["input_ids"].append(ids + [0] * (length - real))
        rows["attention_mask"].append([1] * real + [0] * (length - real))
        rows["labels"].append([-100] * prompt + ids[prompt:] + [-100] * (length - real))
    return Dataset.from_dict(rows)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Collectives in the multi-process workers give up after this many seconds (their ddp_timeout, or the timeout of the
# process group they start themselves), well inside the launches' own limits (300 s and up): a hung peer ends the run
# with an error that names the collective instead of holding the machine until the launch is killed.
DDP_TIMEOUT = 240


def free_port() -> int:
    """A TCP port nothing listens on now, for launchers that must be given one (``accelerate launch``). Another launch
    can take it before the launcher binds it: ``launch_on_a_free_port`` tries again then."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(processes: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` for ``processes`` local processes, standalone: its rendezvous store binds a
    port the system picks and the workers meet through that store, so launches side by side (``pytest -n``) never
    race for a port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def _kill_process_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launch ``process``, every process it started (torchrun starts each worker in a session of its
    own, out of reach of its group) and every process group among them but the test's own."""
    tree = []
    if process.poll() is None:  # still running, so its pid is still its own: walk its tree
        try:
            tree = [psutil.Process(process.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    groups = {process.pid}  # once the launch has ended, whatever it left behind is still in its group
    for member in tree:
        try:
            groups.add(os.getpgid(member.pid))
            member.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    for group in groups - {os.getpgrp()}:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch(command, *, timeout, env=None, cwd=ROOT, check=False) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, timeout=timeout)`` from ``cwd`` (offline by default)
    in a process group of its own, killed with all its processes however the launch ends (success, failure, timeout,
    an interrupted test), so that no worker outlives its test and loads the machine for the tests after it. On a
    timeout, raises ``subprocess.TimeoutExpired`` with the end of stderr in its note; ``check``: assert success."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"} if env is None else env
    process = subprocess.Popen(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as error:
        _kill_process_tree(process)
        try:
            error.output, error.stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process outside the tree still holds the pipes: what came so far
            pass
        stderr = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else error.stderr or ""
        error.add_note(f"stderr (the end):\n{stderr[-4000:]}")
        raise
    finally:
        _kill_process_tree(process)
        process.wait()
    completed = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check:
        assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def launch_on_a_free_port(
    command_for_port, *, timeout, env=None, check=False, attempts=3
) -> subprocess.CompletedProcess:
    """``launch(command_for_port(port))`` on a ``free_port()``, and on a fresh one when another launch bound the port
    between the probe and this launch's rendezvous (its store fails with EADDRINUSE); returns the last launch."""
    for _ in range(attempts):
        completed = launch(command_for_port(free_port()), timeout=timeout, env=env)
        if completed.returncode == 0 or "EADDRINUSE" not in completed.stderr:
            break
    if check:
        assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def push_to_local_hub(tmp_path, worker: str, *flags):
    """Run ``tests/distributed/WORKER OUTPUT_DIR alice/tiny-student FLAGS`` against a local Hub server (its own
    process: huggingface_hub reads HF_ENDPOINT when imported); asserts it succeeded and returns the Hub's state."""
    from hub_server import LocalHub

    env = dict(
        os.environ,
        HF_HUB_OFFLINE="0",
        HF_TOKEN="hf_test_token",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        OMP_NUM_THREADS="1",
    )
    script = os.path.join(ROOT, "tests", "distributed", worker)
    with LocalHub() as hub:
        completed = launch(
            [sys.executable, script, tmp_path / "out", "alice/tiny-student", *flags],
            timeout=300,
            env={**env, "HF_ENDPOINT": hub.endpoint},
        )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return hub.state


def run_two_processes(script, *args, timeout=600):
    """``torchrun --nproc_per_node 2 script args`` from the repository root (gloo on CPU, offline); asserts it
    succeeded and returns the completed process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return launch([*torchrun(2), script, *args], timeout=timeout, env=env, check=True)


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return DistillationConfig(**values)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


def pytest_sessionfinish(session, exitstatus):
    # Only the process that made the folder removes it: under pytest-xdist the controller, after all its workers.
    if OWN_EXTENSIONS_DIR is not None:
        shutil.rmtree(OWN_EXTENSIONS_DIR, ignore_errors=True)
