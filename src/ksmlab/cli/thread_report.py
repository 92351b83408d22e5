"""``ksmlab thread-report``: the reply for the zero-page remap thread."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import fail


def thread_report(
    fmt: Annotated[str, typer.Option("--format", help="text or mbox")] = "text",
    in_reply_to: Annotated[str | None, typer.Option(
        "--in-reply-to", help="Message-ID of the thread's cover letter (mbox)")] = None,
    guest_image: Annotated[Path | None, typer.Option(
        "--guest-image", help="a capture of a paused QEMU guest (ksmlab capture): "
        "adds its rows")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write here")] = None,
) -> None:
    """A plain-text reply for the thread (72 columns, no Markdown): what was measured,
    on what, one table of every proposal (memory freed, by KSM's account, peak over
    budget, ksmd CPU, confirmed on a patched kernel or model only), the selftest
    results, how to reproduce, and what is not known.  Every figure is computed when
    it runs, from the model and the recorded results.

    \b
    Examples:
      ksmlab thread-report
      ksmlab thread-report --format mbox --in-reply-to '<ID@redhat.com>' -o reply.mbox
    """
    from ..thread_report import RFC_MESSAGE_ID, compute, mbox, render

    if fmt not in ("text", "mbox"):
        fail(f"--format {fmt}: text or mbox")
    if fmt == "mbox" and not in_reply_to:
        fail("--format mbox needs --in-reply-to: the stored thread gives no Message-ID "
             f"for its cover letter (only the RFC's, {RFC_MESSAGE_ID}); take it from the "
             "archive")
    if guest_image is not None and not guest_image.is_dir():
        fail(f"--guest-image {guest_image}: not a capture folder (ksmlab capture)")
    text = render(compute(guest_image))
    if fmt == "mbox":
        assert in_reply_to is not None
        text = mbox(text, in_reply_to)
    if out is not None:
        out.write_text(text)
    else:
        print(text, end="")
