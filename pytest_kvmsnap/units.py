"""When a unit's edge reverts a guest: pure decisions, no I/O, no pytest.

A *unit* is the group of tests that share a guest's state (one test, class,
module, package or the whole session, per ``scope``).  At its start and its
end the guest may go back to the unit's baseline, as ``revert`` says.
"""

from __future__ import annotations

REVERTS_BEFORE = ("before", "both")
REVERTS_AFTER = ("after", "both")


def reverts_at_start(mode: str, at: str | None, baseline: str, *, owed: bool) -> bool:
    """Does a unit with revert ``mode`` first put the guest back to ``baseline``?

    ``at`` is the snapshot the guest is known to be exactly at (None: a test
    used it since).  ``owed`` says the previous holder owed a revert it could
    not make (it died mid-unit, or its end-of-unit revert failed): the guest is
    then reverted whatever the mode.  A guest clean at another snapshot (an
    earlier unit asked for ``snapshot=``) is moved whatever the mode too.
    """
    if at == baseline:
        return False
    return mode in REVERTS_BEFORE or owed or at is not None


def reverts_at_end(mode: str, *, failed: bool, forced: bool) -> bool:
    """Does a unit with revert ``mode`` end with a revert?

    ``failed``: one of its tests failed (for ``on-failure``); ``forced``: the
    guest went down during a test and must be restored whatever the mode.
    """
    return forced or mode in REVERTS_AFTER or (mode == "on-failure" and failed)
