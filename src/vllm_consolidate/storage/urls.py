"""Object-store URLs and keys: parsing, and confinement of the keys a listing returns.

No I/O here. A key is confined like a path: a listing may return any string, and a key such as
``prefix/../other/x`` or ``prefix//x`` must not let a checkpoint name an object outside its input.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_consolidate.errors import UnsafeInputError, UsageError

#: Schemes we accept, and the store kind each selects. ``s3a`` is Hadoop's alias of ``s3``.
SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "azure": "azure", "abfs": "azure"}
MAX_KEY_BYTES = 1024  # S3's own limit; GCS and Azure allow about the same


@dataclass(frozen=True)
class ObjectURL:
    """``scheme://bucket/prefix``: ``prefix`` has no leading or trailing slash ('' for the bucket's root)."""

    scheme: str
    bucket: str
    prefix: str

    @property
    def kind(self) -> str:
        """``s3``, ``gcs`` or ``azure``."""
        return SCHEMES[self.scheme]

    @property
    def bucket_url(self) -> str:
        return f"{self.scheme}://{self.bucket}"

    def key(self, relative: str = "") -> str:
        """The full key of ``relative`` (a confined, '/'-separated path) under this prefix."""
        if not relative:
            return self.prefix
        check_relative(relative, what="key")
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def child(self, relative: str) -> ObjectURL:
        return ObjectURL(self.scheme, self.bucket, self.key(relative))

    def sibling(self, name: str) -> ObjectURL:
        """A prefix next to this one (``a/b`` -> ``a/<name>``), for staging an output beside it."""
        check_relative(name, what="name")
        parent, _, _ = self.prefix.rpartition("/")
        return ObjectURL(self.scheme, self.bucket, f"{parent}/{name}" if parent else name)

    @property
    def name(self) -> str:
        return self.prefix.rpartition("/")[2]

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.prefix}" if self.prefix else f"{self.scheme}://{self.bucket}"


def is_object_url(text: object) -> bool:
    """Whether ``text`` is meant as an object URL (a known scheme followed by ``://``)."""
    if not isinstance(text, str) or "://" not in text:
        return False
    return text.split("://", 1)[0].lower() in SCHEMES


def parse_object_url(text: str) -> ObjectURL:
    """Parse ``scheme://bucket[/prefix]``.

    Raises:
        UsageError: unknown scheme, no bucket, or a prefix with ``.``/``..``/empty segments.
    """
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise UsageError(f"not an object-store URL: {text!r}", hint="Use s3://bucket/prefix, gs://… or az://….")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not bucket or "/" in bucket:
        raise UsageError(f"no bucket in {text!r}", hint="Use s3://bucket/prefix.")
    if prefix:
        try:
            check_relative(prefix, what="prefix")
        except UnsafeInputError as exc:
            raise UsageError(f"{exc.message} in {text!r}", hint="Name the prefix without '.', '..' or '//'.") from exc
    return ObjectURL(scheme, bucket, prefix)


def check_relative(rel: str, *, what: str = "key") -> None:
    """Refuse a relative key that could leave its prefix or alias another (``..``, ``.``, ``//``, ``\\``, NUL)."""
    if len(rel.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise UnsafeInputError(f"{what} longer than {MAX_KEY_BYTES} bytes")
    if rel.startswith("/") or "\\" in rel or "\x00" in rel:
        raise UnsafeInputError(f"{what} {rel[:200]!r} is absolute or holds a backslash or NUL")
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            raise UnsafeInputError(f"{what} {rel[:200]!r} has an empty, '.' or '..' segment; it could name an object "
                                   "outside the input")


def relative_key(key: str, prefix: str) -> str:
    """``key`` relative to ``prefix`` (confined), for a key a listing under ``prefix`` returned.

    Raises:
        UnsafeInputError: the key is not under the prefix, or its remainder is not a confined path.
    """
    lead = f"{prefix}/" if prefix else ""
    if not key.startswith(lead) or key == prefix:
        raise UnsafeInputError(f"listing returned {key[:200]!r}, which is not under {prefix!r}")
    rel = key[len(lead):]
    check_relative(rel)
    return rel
