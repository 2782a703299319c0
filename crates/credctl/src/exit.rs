//! Exit codes, one per kind of failure, so scripts can tell them apart.

pub const OK: u8 = 0;
pub const OTHER: u8 = 1;
pub const USAGE: u8 = 2;
pub const UNREACHABLE: u8 = 3;
pub const NOT_FOUND: u8 = 4;
pub const INVALID_ARGUMENT: u8 = 5;
pub const FAILED_PRECONDITION: u8 = 6;
pub const UNAVAILABLE: u8 = 7;
pub const DEADLINE_EXCEEDED: u8 = 8;
pub const UNAUTHENTICATED: u8 = 9;
pub const PERMISSION_DENIED: u8 = 10;
pub const UNIMPLEMENTED: u8 = 11;
pub const INTERNAL: u8 = 12;
pub const ABORTED: u8 = 13;
pub const NOT_ALL_IMPORTED: u8 = 14;

/// The table `credctl --help` prints.
pub(crate) const EXIT_CODES: &str = "\
Exit codes:
   0  success
   1  other error
   2  usage error
   3  cannot reach the service
   4  NOT_FOUND (unknown account, or unknown/expired/used state)
   5  INVALID_ARGUMENT (malformed account, code, state or duration)
   6  FAILED_PRECONDITION (EdgeTag rejected the code, or the account needs re-authorization)
   7  UNAVAILABLE (EdgeTag unreachable; retry later)
   8  DEADLINE_EXCEEDED
   9  UNAUTHENTICATED (missing or wrong --token-file / --token / CREDCTL_TOKEN)
  10  PERMISSION_DENIED (this caller may not do that)
  11  UNIMPLEMENTED (the service is older than this credctl)
  12  INTERNAL (the service's log has the cause)
  13  ABORTED (EdgeTag approved, but the service could not keep it; start again with `credctl begin`)
  14  import: some lines were not imported (each line's result says why)";
