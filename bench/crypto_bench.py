"""Crypto benchmark: the encrypted channel's records, ChaChaPoly against AES-GCM, and its handshake.

Measures, in one run and one process (one core), each beside a reference from the same run:
  1. records, encrypt + decrypt: `Channel.seal_records()` on one side and `receive_data()` on
     the other, record by record as `SecureLink` writes them, 1 MiB at a time (16 full records
     of 65,519 bytes and one short), for each cipher this machine runs; reference: a plain copy
     of the same bytes into record-sized pieces (what any framing costs at least);
  2. the same through two `SecureLink`s joined by an in-memory pipe (the asyncio pump added);
     reference: 1;
  3. the AEAD alone (pynacl, one 65,519-byte record encrypted then decrypted), for each cipher;
     reference: `openssl speed -evp` for the same construction (encryption only, 16 KiB blocks,
     OpenSSL's own assembly), when `openssl` is on PATH;
  4. the handshake: both sides of `Noise_XXpsk3_25519_<cipher>_BLAKE2b` with the device identity
     (sans-IO, no event loop), median of many; reference: the same pattern with the
     `noiseprotocol` package (its `cryptography` backend, no identity payloads), if installed;
  5. `secure()` on both ends of an in-memory pipe (the handshake with its asyncio pump);
     reference: 4.
Then it names the faster cipher and the one `secure()` picks by default (AES-GCM whenever both
ends can run it, docs/protocol.md section 1). Figures are printed, never written to the docs.

    python bench/crypto_bench.py            # full run (~15 s)
    python bench/crypto_bench.py --quick    # smoke run (~2 s), no openssl
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import nacl.bindings as sodium
from common import Row, machine, text_table
from nacl.signing import SigningKey

from backer.keys import FolderKey
from backer.mesh.channel import MAX_PLAINTEXT, Channel
from backer.mesh.noise import CipherName, available_ciphers, protocol_name
from backer.mesh.secure import secure
from backer.sync.link import memory_pipe

BLOCK = 1024 * 1024
_OPENSSL_NAMES: dict[CipherName, str] = {
    "ChaChaPoly": "chacha20-poly1305",
    "AESGCM": "aes-256-gcm",
}
_AEADS: dict[CipherName, tuple[Callable[..., bytes], Callable[..., bytes]]] = {
    "ChaChaPoly": (
        sodium.crypto_aead_chacha20poly1305_ietf_encrypt,
        sodium.crypto_aead_chacha20poly1305_ietf_decrypt,
    ),
    "AESGCM": (sodium.crypto_aead_aes256gcm_encrypt, sodium.crypto_aead_aes256gcm_decrypt),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run, no openssl")
    args = parser.parse_args(argv)
    volume = 8 * BLOCK if args.quick else 256 * BLOCK
    repeats = 1 if args.quick else 3
    handshakes = 20 if args.quick else 300

    ciphers = available_ciphers()
    print(f"machine: {machine()}")
    print(f"ciphers this machine runs: {', '.join(ciphers)}")
    copy = best_of(repeats, lambda: copy_rate(volume))
    records = {c: best_of(repeats, functools.partial(record_rate, c, volume)) for c in ciphers}
    aead = {c: best_of(repeats, functools.partial(aead_rate, c, volume)) for c in ciphers}
    links = {c: asyncio.run(link_rate(c, volume)) for c in ciphers}
    openssl = {c: (None if args.quick else openssl_rate(c)) for c in ciphers}
    ours = {c: handshake_time(c, handshakes) for c in ciphers}
    theirs = {c: noiseprotocol_handshake_time(c, handshakes) for c in ciphers}
    pumped = {c: asyncio.run(secure_time(c, max(5, handshakes // 10))) for c in ciphers}

    rows: list[Row] = []
    for c in ciphers:
        rows.append(
            Row(
                measure=f"{c} records, encrypt+decrypt",
                backer=gbps(records[c]),
                reference=f"copy {gbps(copy)}",
                ratio=f"{records[c] / copy:.3f}",
            )
        )
    for c in ciphers:
        rows.append(
            Row(
                measure=f"{c} SecureLink over a memory pipe",
                backer=gbps(links[c]),
                reference=f"records {gbps(records[c])}",
                ratio=f"{links[c] / records[c]:.2f}",
            )
        )
    for c in ciphers:
        ref = openssl[c]
        rows.append(
            Row(
                measure=f"{c} AEAD alone, encrypt+decrypt",
                backer=gbps(aead[c]),
                reference="openssl skipped" if ref is None else f"openssl encrypt {gbps(ref)}",
                ratio="-" if ref is None else f"{aead[c] / ref:.2f}",
            )
        )
    for c in ciphers:
        ref_time = theirs[c]
        rows.append(
            Row(
                measure=f"{c} handshake, both sides",
                backer=ms(ours[c]),
                reference="noiseprotocol n/a"
                if ref_time is None
                else f"noiseprotocol {ms(ref_time)}",
                ratio="-" if ref_time is None else f"{ours[c] / ref_time:.2f}",
            )
        )
    for c in ciphers:
        rows.append(
            Row(
                measure=f"{c} secure() over a memory pipe",
                backer=ms(pumped[c]),
                reference=f"sans-IO {ms(ours[c])}",
                ratio=f"{pumped[c] / ours[c]:.2f}",
            )
        )
    print()
    print(text_table(rows))
    print()
    fastest = max(ciphers, key=lambda c: records[c])
    default = "AESGCM" if "AESGCM" in ciphers else "ChaChaPoly"
    if len(ciphers) > 1:
        print(
            f"AESGCM / ChaChaPoly records: {records['AESGCM'] / records['ChaChaPoly']:.2f}x; "
            f"AEAD alone: {aead['AESGCM'] / aead['ChaChaPoly']:.2f}x"
        )
    print(f"faster cipher here: {fastest}; secure() picks by default: {default}")
    if fastest != default and not args.quick:  # a quick run is too short to judge
        print(f"WARNING the default ({default}) is not the faster cipher here ({fastest})")
    return 0


# -- measurements --------------------------------------------------------------------------------


def best_of(repeats: int, measure: Callable[[], float]) -> float:
    return max(measure() for _ in range(repeats))


def copy_rate(volume: int) -> float:
    """Bytes per second of slicing the data into record-sized copies (the framing floor)."""
    data = os.urandom(BLOCK)
    view = memoryview(data)
    started = time.perf_counter()
    for _ in range(volume // BLOCK):
        for at in range(0, BLOCK, MAX_PLAINTEXT):
            bytes(view[at : at + MAX_PLAINTEXT])
    return volume / (time.perf_counter() - started)


def record_rate(cipher: CipherName, volume: int) -> float:
    """Bytes per second through seal_records() and receive_data() of two established channels,
    record by record (as SecureLink writes them)."""
    sender, receiver = channel_pair(cipher)
    data = os.urandom(BLOCK)
    started = time.perf_counter()
    for _ in range(volume // BLOCK):
        got = 0
        for record in sender.seal_records(data):
            got += len(receiver.receive_data(record))
        if got != BLOCK:
            raise SystemExit("the records did not round-trip")
    return volume / (time.perf_counter() - started)


async def link_rate(cipher: CipherName, volume: int) -> float:
    """Bytes per second of 1 MiB writes through two SecureLinks joined by a memory pipe."""
    folder = FolderKey.generate()
    one, two = memory_pipe()
    writer, reader = await asyncio.gather(
        secure(
            one, initiator=True, device_key=SigningKey.generate(), folder=folder, ciphers=[cipher]
        ),
        secure(
            two, initiator=False, device_key=SigningKey.generate(), folder=folder, ciphers=[cipher]
        ),
    )
    data = os.urandom(BLOCK)

    async def send() -> None:
        for _ in range(volume // BLOCK):
            await writer.write(data)

    started = time.perf_counter()
    sending = asyncio.create_task(send())
    got = 0
    while got < volume:
        got += len(await reader.read())
    await sending
    elapsed = time.perf_counter() - started
    await writer.close()
    await reader.close()
    return volume / elapsed


def aead_rate(cipher: CipherName, volume: int) -> float:
    encrypt, decrypt = _AEADS[cipher]
    key = os.urandom(32)
    record = os.urandom(MAX_PLAINTEXT)
    count = volume // MAX_PLAINTEXT
    started = time.perf_counter()
    for n in range(count):
        nonce = n.to_bytes(12, "big")
        decrypt(encrypt(record, b"", nonce, key), b"", nonce, key)
    return count * MAX_PLAINTEXT / (time.perf_counter() - started)


def openssl_rate(cipher: CipherName) -> float | None:
    """`openssl speed -evp` for 16 KiB blocks over 1 s: encryption bytes per second."""
    if shutil.which("openssl") is None:
        return None
    argv = ["openssl", "speed", "-mr", "-elapsed", "-seconds", "1", "-bytes", "16384"]
    try:
        done = subprocess.run(
            [*argv, "-evp", _OPENSSL_NAMES[cipher]],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in done.stdout.splitlines():
        if line.startswith("+F:"):
            return float(line.rsplit(":", 1)[1])
    return None


def channel_pair(cipher: CipherName) -> tuple[Channel, Channel]:
    folder = FolderKey.generate()
    sides = [
        Channel(
            initiator=initiator,
            device_key=SigningKey.generate(),
            psk=folder.psk,
            discovery_id=folder.discovery_id,
            ciphers=[cipher],
        )
        for initiator in (True, False)
    ]
    handshake(sides[0], sides[1])
    return sides[0], sides[1]


def handshake(initiator: Channel, responder: Channel) -> None:
    initiator.start()
    responder.start()
    while not (initiator.established and responder.established):
        responder.receive_data(initiator.data_to_send())
        initiator.receive_data(responder.data_to_send())


def handshake_time(cipher: CipherName, count: int) -> float:
    folder = FolderKey.generate()
    keys = [SigningKey.generate() for _ in range(2)]
    times = []
    for _ in range(count):
        started = time.perf_counter()
        pair = [
            Channel(
                initiator=initiator,
                device_key=key,
                psk=folder.psk,
                discovery_id=folder.discovery_id,
                ciphers=[cipher],
            )
            for initiator, key in zip((True, False), keys, strict=True)
        ]
        handshake(pair[0], pair[1])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def noiseprotocol_handshake_time(cipher: CipherName, count: int) -> float | None:
    """The same pattern with the noiseprotocol package (no identity payloads), if installed."""
    try:
        connection: Any = importlib.import_module("noise.connection")
    except ImportError:
        return None
    keypair, noise_connection = connection.Keypair, connection.NoiseConnection
    psk = os.urandom(32)
    statics = [os.urandom(32) for _ in range(2)]
    times = []
    for _ in range(count):
        started = time.perf_counter()
        ends: list[Any] = []
        for initiator, static in zip((True, False), statics, strict=True):
            end = noise_connection.from_name(protocol_name(cipher))
            end.set_psks(psk)
            end.set_prologue(b"bench")
            end.set_keypair_from_private_bytes(keypair.STATIC, static)
            if initiator:
                end.set_as_initiator()
            else:
                end.set_as_responder()
            end.start_handshake()
            ends.append(end)
        writer, reader = ends
        while not writer.handshake_finished:
            reader.read_message(writer.write_message())
            writer, reader = reader, writer
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def secure_time(cipher: CipherName, count: int) -> float:
    folder = FolderKey.generate()
    keys = [SigningKey.generate() for _ in range(2)]
    times = []
    for _ in range(count):
        one, two = memory_pipe()
        started = time.perf_counter()
        links = await asyncio.gather(
            secure(one, initiator=True, device_key=keys[0], folder=folder, ciphers=[cipher]),
            secure(two, initiator=False, device_key=keys[1], folder=folder, ciphers=[cipher]),
        )
        times.append(time.perf_counter() - started)
        for link in links:
            await link.close()
    return statistics.median(times)


def gbps(rate: float) -> str:
    return f"{rate / 1e9:.2f} GB/s"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


if __name__ == "__main__":
    sys.exit(main())
