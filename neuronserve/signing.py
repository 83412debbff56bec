"""Artifact signatures: Ed25519 over manifest.json's exact bytes, kept beside it in manifest.sig.

manifest.json already carries the sha256 of every other file of the artifact, so a signature over its
bytes covers the whole artifact. `manifest_sha256` alone is integrity, not authenticity: anyone who can
write the artifact can edit the manifest and recompute it. A signature needs the private key, which
never enters the artifact: manifest.sig holds only the signature and the signer's public key (a hint
for `inspect`; trust comes from the operator's --trusted-key file, never from the artifact).

Keys are PEM files, as `openssl genpkey -algorithm ed25519` writes them: the private key PKCS#8
(unencrypted, mode 0600), the public key SubjectPublicKeyInfo. A trusted-key file holds one or more
PEM public keys (a keyring: concatenate them). A key's fingerprint is the first 16 hex digits of
sha256 over its 32 raw public bytes. manifest.sig is JSON: {"format", "signed_file", "public_key",
"signature"} with base64 values. Works with cryptography >= 3.4 (imported on first use).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from neuronserve.errors import ArtifactError, ConfigError

SIGNATURE_NAME = "manifest.sig"
SIGNATURE_FORMAT = "neuronserve-ed25519-v1"
PRIVATE_KEY_NAME = "signing-key.pem"
PUBLIC_KEY_NAME = "signing-key.pub.pem"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.S)
_MAX_KEY_FILE_BYTES = 1 << 20  # a keyring larger than this is not a keyring


def fingerprint(public_raw: bytes) -> str:
    """A key's short name: the first 16 hex digits of sha256 of its 32 raw public bytes."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _raw_public(public_key) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _read_key_file(path, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc.strerror})") from None
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{what} {path}: larger than {_MAX_KEY_FILE_BYTES} bytes, not a PEM key file")
    return data


@dataclass(frozen=True)
class TrustedKeys:
    """The Ed25519 public keys an artifact may be signed by, read from `source` (a PEM keyring)."""

    source: str
    keys: tuple[bytes, ...]  # raw 32-byte public keys, in file order

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(fingerprint(k) for k in self.keys)

    def describe(self) -> str:
        return f"{', '.join(self.fingerprints)} from {self.source}"


def load_trusted_keys(path) -> TrustedKeys:
    """Every PEM public key in the file `path` (at least one, all Ed25519); ConfigError naming the file
    otherwise (a private key here is refused: give the .pub.pem)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    what = "trusted key file"
    data = _read_key_file(path, what)
    keys = []
    for number, match in enumerate(_PEM_BLOCK.finditer(data), 1):
        label = match.group(1).decode()
        if "PRIVATE" in label:
            raise ConfigError(
                f"{what} {path}: block {number} is a private key; give the public key (keygen's {PUBLIC_KEY_NAME}) and keep the private key off the server"
            )
        if label != "PUBLIC KEY":
            continue  # certificates and the like: not a key we use
        try:
            key = load_pem_public_key(match.group(0))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{what} {path}: block {number} is not a readable public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(
                f"{what} {path}: block {number} is a {type(key).__name__.lstrip('_')}, not an Ed25519 public key"
            )
        keys.append(_raw_public(key))
    if not keys:
        raise ConfigError(
            f"{what} {path}: no PEM public key in it; give the {PUBLIC_KEY_NAME} that `neuronserve keygen` wrote"
        )
    return TrustedKeys(str(path), tuple(dict.fromkeys(keys)))


def load_private_key(path):
    """The Ed25519 private key in the PEM file `path`; ConfigError naming the file otherwise."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    what = "signing key"
    data = _read_key_file(path, what)
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:  # encrypted
        raise ConfigError(
            f"{what} {path}: the key is encrypted; give an unencrypted PKCS#8 PEM key (as `neuronserve keygen` writes)"
        ) from None
    except ValueError as exc:
        raise ConfigError(
            f"{what} {path}: not a readable PEM private key ({str(exc).splitlines()[0] if str(exc) else 'malformed'})"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            f"{what} {path}: a {type(key).__name__.lstrip('_')}, not an Ed25519 private key; make one with `neuronserve keygen`"
        )
    return key


def load_signing_key(path, artifact_dir):
    """load_private_key(path), refused first if the key lies inside `artifact_dir`: the private key is
    never part of an artifact (and compile --force would delete it with the old artifact)."""
    key_path, artifact = Path(path).resolve(), Path(artifact_dir).resolve()
    if key_path == artifact or artifact in key_path.parents:
        raise ConfigError(
            f"--signing-key {path} is inside the artifact {artifact_dir}: the private key must never be part of the artifact; keep it elsewhere"
        )
    return load_private_key(path)


def generate_key_pair(out_dir, force: bool = False) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair into `out_dir` (made 0700 if missing): PRIVATE_KEY_NAME (PKCS#8
    PEM, mode 0600) and PUBLIC_KEY_NAME (PEM, 0644). Existing files are replaced only with force.
    Returns (private path, public path, fingerprint)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    out = Path(out_dir)
    private_path, public_path = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    if not force:
        taken = [str(p) for p in (private_path, public_path) if os.path.lexists(p)]
        if taken:
            raise ConfigError(
                f"{' and '.join(taken)} already {'exists' if len(taken) == 1 else 'exist'}; pass --force to replace the key pair or choose another --out"
            )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    public_pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_atomic(private_path, private_pem, 0o600)
        _write_atomic(public_path, public_pem, 0o644)
    except OSError as exc:
        raise ConfigError(
            f"keygen: cannot write the key pair into {out} ({exc.strerror}); choose a writable --out"
        ) from None
    return private_path, public_path, fingerprint(_raw_public(key.public_key()))


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """`data` into `path` through a temporary file created with `mode` (never readable by others on the way)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; this is the mode asked for
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp.exists():
            tmp.unlink()


def signature_file(manifest_bytes: bytes, private_key) -> bytes:
    """The content of manifest.sig for these manifest.json bytes, signed with `private_key`."""
    body = {
        "format": SIGNATURE_FORMAT,
        "signed_file": "manifest.json",
        "public_key": base64.b64encode(_raw_public(private_key.public_key())).decode(),
        "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode(),
    }
    return (json.dumps(body, indent=2) + "\n").encode()


def write_signature(directory, manifest_bytes: bytes, private_key) -> str:
    """Sign `manifest_bytes` (the artifact's manifest.json, as read) into DIR/manifest.sig; the key's fingerprint."""
    path = Path(directory) / SIGNATURE_NAME
    try:
        _write_atomic(path, signature_file(manifest_bytes, private_key), 0o644)
    except OSError as exc:
        raise ArtifactError(f"cannot write {path} ({exc.strerror})") from None
    return fingerprint(_raw_public(private_key.public_key()))


@dataclass(frozen=True)
class SignatureCheck:
    """What the artifact's manifest.sig says about manifest.json (see check_signature)."""

    signed: bool  # manifest.sig is present
    fingerprint: str | None = (
        None  # the key that signed (the trusted key it verified under, else the key manifest.sig names)
    )
    valid: bool = False  # the signature verifies over manifest.json
    trusted: bool | None = None  # None: no trusted key was asked for; True: verified by a trusted key

    def describe(self) -> str:
        """One line for `inspect`."""
        if not self.signed:
            return "none: integrity only (sha256 of every file, which anyone able to write the artifact can recompute); sign with compile --signing-key"
        if self.trusted:
            return f"ed25519, verified with trusted key {self.fingerprint}"
        if self.fingerprint is None:
            return f"{SIGNATURE_NAME} is malformed; not checked against a trusted key"
        if not self.valid:
            return f"ed25519 by key {self.fingerprint}, INVALID: manifest.json was changed after it was signed"
        return f"ed25519 by key {self.fingerprint}, valid for that key; not checked against a trusted key (pass --trusted-key to require it)"


def _verifies(public_raw: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _parse_signature(sig_bytes: bytes, where: str) -> tuple[bytes, bytes]:
    """(the named public key, the signature) from manifest.sig; ArtifactError if it is malformed."""
    try:
        body = json.loads(sig_bytes)
        if not isinstance(body, dict) or body.get("format") != SIGNATURE_FORMAT:
            raise ValueError(f"not a {SIGNATURE_FORMAT} signature")
        public_raw = base64.b64decode(body["public_key"], validate=True)
        signature = base64.b64decode(body["signature"], validate=True)
        if len(public_raw) != 32 or len(signature) != 64:
            raise ValueError("wrong key or signature length")
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ArtifactError(f"{where} is malformed ({exc}); re-sign the artifact with `neuronserve sign`") from None
    return public_raw, signature


def check_signature(
    manifest_bytes: bytes, sig_bytes: bytes | None, where: str, trusted: TrustedKeys | None
) -> SignatureCheck:
    """Check manifest.sig (`sig_bytes`, None when absent; `where` its path) over `manifest_bytes`.

    Without `trusted`: reports, never refuses an unsigned or badly signed artifact (integrity only).
    With `trusted`: returns only when the signature verifies under one of its keys (the key named in
    manifest.sig is a hint, never trusted itself); otherwise an ArtifactError saying why.
    """
    if sig_bytes is None:
        if trusted is not None:
            raise ArtifactError(
                f"{where} is missing: the artifact is not signed, and a signature by a trusted key ({trusted.describe()}) is required; "
                "sign it with `neuronserve sign` or compile it with --signing-key"
            )
        return SignatureCheck(signed=False)
    try:
        named, signature = _parse_signature(sig_bytes, where)
    except ArtifactError:
        if trusted is not None:
            raise
        return SignatureCheck(True)  # malformed: reported by inspect, refused only when a trusted key is required
    if trusted is None:
        return SignatureCheck(True, fingerprint(named), _verifies(named, signature, manifest_bytes))
    for key in trusted.keys:
        if _verifies(key, signature, manifest_bytes):
            return SignatureCheck(True, fingerprint(key), True, True)
    if named in trusted.keys or not _verifies(named, signature, manifest_bytes):
        raise ArtifactError(
            f"{where} does not verify: manifest.json was changed after it was signed (signature by key {fingerprint(named)}; "
            f"trusted: {trusted.describe()}); restore the artifact or recompile and sign it"
        )
    raise ArtifactError(
        f"{where} is by key {fingerprint(named)}, which is not trusted (trusted: {trusted.describe()}); "
        "sign the artifact with a trusted key or add its public key to the trusted-key file"
    )
