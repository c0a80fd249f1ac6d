use std::os::unix::fs::symlink;

use super::*;

/// A fresh directory standing for a command's root.
fn root(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("capsule-init-mounts-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::create_dir_all(dir.join("usr/lib")).unwrap();
    dir
}

#[test]
fn dot_dot_stops_at_the_root() {
    let r = root("dotdot");
    for (path, want) in [
        (&b"/etc/resolv.conf"[..], "etc/resolv.conf"),
        (b"etc/./hosts", "etc/hosts"),
        (b"/../../../etc/passwd", "etc/passwd"),
        (b"/data/../../../../x", "x"),
        (b"//usr//lib/../lib/", "usr/lib"),
        (b"/no/such/../dir", "no/dir"),
    ] {
        assert_eq!(
            resolve_in_root(&r, path).unwrap(),
            r.join(want),
            "{}",
            String::from_utf8_lossy(path)
        );
    }
    assert_eq!(resolve_in_root(&r, b"/..").unwrap(), r);
    fs::remove_dir_all(&r).unwrap();
}

#[test]
fn symlinks_are_followed_inside_the_root() {
    let r = root("links");
    // An absolute link is read from the root, not from the init's `/`.
    symlink("/usr/lib", r.join("lib")).unwrap();
    // A relative one that climbs past the root stays in it.
    symlink("../../../../../etc", r.join("usr/escape")).unwrap();
    symlink("/../../tmp", r.join("etc/tmp")).unwrap();
    // A link to a link.
    symlink("lib", r.join("lib2")).unwrap();
    symlink("/etc/hosts.real", r.join("etc/hosts")).unwrap();
    for (path, want) in [
        (&b"/lib/x.so"[..], "usr/lib/x.so"),
        (b"/usr/escape/resolv.conf", "etc/resolv.conf"),
        (b"/etc/tmp/f", "tmp/f"),
        (b"/lib2/../lib/y", "usr/lib/y"),
        (b"/etc/hosts", "etc/hosts.real"),
    ] {
        let got = resolve_in_root(&r, path).unwrap();
        assert_eq!(got, r.join(want), "{}", String::from_utf8_lossy(path));
        assert!(got.starts_with(&r));
    }
    // `..` after a link climbs from the link's target, as the kernel's
    // lookup does: /lib/.. is /usr.
    assert_eq!(
        resolve_in_root(&r, b"/lib/../bin").unwrap(),
        r.join("usr/bin")
    );
    fs::remove_dir_all(&r).unwrap();
}

#[test]
fn a_symlink_loop_is_an_error() {
    let r = root("loop");
    symlink("b", r.join("a")).unwrap();
    symlink("a", r.join("b")).unwrap();
    let e = resolve_in_root(&r, b"/a/x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
    fs::remove_dir_all(&r).unwrap();
}

#[test]
fn mount_points_are_made_inside_the_root() {
    let r = root("points");
    symlink("/../../../..", r.join("up")).unwrap();
    let d = mount_point(&r, b"/up/data/sub", Kind::Dir).unwrap();
    assert_eq!(d, r.join("data/sub"));
    assert!(d.is_dir());
    // A missing file is created empty, with its directories.
    let f = mount_point(&r, b"/up/run/secrets/token", Kind::File).unwrap();
    assert_eq!(f, r.join("run/secrets/token"));
    assert_eq!(fs::read(&f).unwrap(), b"");
    // An existing file is kept as it is.
    fs::write(r.join("etc/hostname"), "image\n").unwrap();
    let f = mount_point(&r, b"/etc/hostname", Kind::File).unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"image\n");
    // A file cannot go over a directory, nor anything over the root.
    let e = mount_point(&r, b"/etc", Kind::File).unwrap_err();
    assert!(e.contains("a directory is there"), "{e}");
    let e = mount_point(&r, b"/../", Kind::Dir).unwrap_err();
    assert!(e.contains("the root itself"), "{e}");
    let e = mount_point(&r, b"/up", Kind::Dir).unwrap_err();
    assert!(e.contains("the root itself"), "{e}");
    fs::remove_dir_all(&r).unwrap();
}

#[test]
fn tmpfs_options_become_flags_and_data() {
    let (flags, data) = tmpfs_options(b"nosuid,noexec,nodev,mode=1777,size=65536k");
    assert_eq!(flags, libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV);
    assert_eq!(data, "mode=1777,size=65536k");
    let (flags, data) = tmpfs_options(b"ro,rprivate,tmpcopyup,uid=5,gid=6,bogus=1,nr_inodes=9");
    assert_eq!(flags, libc::MS_RDONLY);
    assert_eq!(data, "uid=5,gid=6,nr_inodes=9");
    assert_eq!(tmpfs_options(b""), (0, String::new()));
}

#[test]
fn parents_are_mounted_before_what_is_inside_them() {
    let spec = ExecSpec {
        shares: vec![(b"/data/sub".to_vec(), true), (b"/data".to_vec(), false)],
        files: vec![
            (b"/data/sub/f".to_vec(), false),
            (b"/etc/hosts".to_vec(), false),
        ],
        tmpfs: vec![(b"/run".to_vec(), Vec::new())],
        ..ExecSpec::default()
    };
    let order: Vec<Planned> = plan(&spec).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        order,
        [
            Planned::Share(1),
            Planned::Tmpfs(0),
            Planned::Share(0),
            Planned::File(1),
            Planned::File(0),
        ]
    );
}
