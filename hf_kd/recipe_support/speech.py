"""Speech the recipes make offline: text spoken by Debian's espeak-ng in a chosen voice, resampled to 16 kHz and
cached per voice (the cross-modal and speech-recognition recipes). Recipe support: library code never imports it."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

RATE = 16_000  # samples per second of every clip (wav2vec 2.0's and Whisper's rate)


def speak(text: str, voice: str, words_per_minute: int) -> np.ndarray:
    """``text`` spoken by espeak-ng (22,050 Hz) resampled to 16 kHz.

    Args:
        text: What to say.
        voice: An espeak-ng voice, e.g. ``"en-us"``, ``"en-gb+f1"`` (a variant after ``+``).
        words_per_minute: The speaking rate.

    Returns:
        The samples as int16.

    Raises:
        subprocess.CalledProcessError: espeak-ng failed (an unknown voice).
    """
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(words_per_minute), "--stdout", text], capture_output=True, check=True
    ).stdout
    with warnings.catch_warnings():  # a streamed WAV header gives no length
        warnings.simplefilter("ignore")
        rate, audio = wavfile.read(io.BytesIO(wav))
    audio = resample_poly(audio.astype(np.float32), RATE, rate) if rate != RATE else audio.astype(np.float32)
    return np.clip(audio, -32768, 32767).astype(np.int16)


def spoken(texts: list[str], voice: str, words_per_minute: int, cache_dir: str) -> list[np.ndarray]:
    """Every text in ``voice`` (:func:`speak`), cached as one file per voice, rate and list of texts (a digest of
    the texts in its name: another list, even of the same length, never reads these clips).

    Args:
        texts: What to say, one clip each.
        voice: An espeak-ng voice.
        words_per_minute: The speaking rate.
        cache_dir: The folder of the cache (``cache_dir/speech/...npz``: int16 samples and offsets).

    Returns:
        One int16 clip per text, in order.
    """
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, "speech", f"{voice}-{words_per_minute}wpm-{len(texts)}-{digest}.npz")
    if os.path.exists(path):
        cached = np.load(path)
        return np.split(cached["samples"], cached["offsets"][1:-1])
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # espeak-ng runs as its own process
        clips = list(pool.map(lambda text: speak(text, voice, words_per_minute), texts))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    offsets = np.cumsum([0, *(len(clip) for clip in clips)])
    np.savez(path + ".partial.npz", samples=np.concatenate(clips), offsets=offsets)
    os.replace(path + ".partial.npz", path)  # a run stopped mid-way leaves no half-written cache
    return clips
