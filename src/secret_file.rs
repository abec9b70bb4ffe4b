//! Files that hold secrets (the local issuer's key set, the SigV4 credentials file): whoever can read one
//! can mint tokens or sign as any caller, so loading one warns when anyone but the service may read it.
//! Containers commonly mount secrets 0644, so this warns rather than refuses.

use std::path::Path;

/// Logs a warning naming `what` when `path`'s mode lets anyone but the service read it.
pub fn warn_if_shared(path: &Path, what: &str) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode();
        // SAFETY: getegid has no preconditions and cannot fail.
        let own_group = unsafe { libc::getegid() };
        if readable_by_others(mode, metadata.gid(), own_group) {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:04o}", mode & 0o7777),
                "{what} is accessible to its group or others; restrict it to the service's user \
                 (chmod 600)"
            );
        }
    }
}

/// Whether a file of `mode` owned by group `file_group` is open to anyone but this process. Group access
/// counts only when the group is not the process's own: Kubernetes mounts a Secret for a non-root pod as
/// root-owned with group `fsGroup` (the pod's `runAsGroup`) and mode 0440, and that is as private as a
/// mounted secret gets.
fn readable_by_others(mode: u32, file_group: u32, own_group: u32) -> bool {
    mode & 0o007 != 0 || (mode & 0o070 != 0 && file_group != own_group)
}

#[cfg(test)]
mod tests {
    use super::readable_by_others;

    #[test]
    fn only_the_services_own_group_may_share_a_secret_file() {
        let (ours, theirs) = (65532, 0);
        assert!(!readable_by_others(0o600, theirs, ours), "owner only");
        assert!(
            !readable_by_others(0o440, ours, ours),
            "Kubernetes Secret with fsGroup = runAsGroup"
        );
        assert!(readable_by_others(0o640, theirs, ours), "another group");
        assert!(readable_by_others(0o644, ours, ours), "everyone");
        assert!(
            readable_by_others(0o604, ours, ours),
            "others without group"
        );
    }
}
