use super::*;

fn spec(json: &str) -> Spec {
    serde_json::from_str(json).unwrap()
}

#[test]
fn the_network_namespace_path_comes_from_the_spec() {
    let with = spec(
        r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"pid"},
        {"type":"network","path":"/var/run/netns/p1"},{"type":"mount"}]}}"#,
    );
    assert_eq!(netns_path(&with), Some(PathBuf::from("/var/run/netns/p1")));
    // A new, empty namespace (no path) or none at all: no network.
    let new = spec(r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"network"}]}}"#);
    assert_eq!(netns_path(&new), None);
    assert_eq!(netns_path(&spec(r#"{"ociVersion":"1.0.2"}"#)), None);
    // A CRI pod's pause container leaves the network to the pod's
    // application container; that one gets it.
    let pause = spec(
        r#"{"ociVersion":"1.0.2","annotations":{"io.kubernetes.cri.container-type":"sandbox"},
        "linux":{"namespaces":[{"type":"network","path":"/var/run/netns/p1"}]}}"#,
    );
    assert_eq!(netns_path(&pause), None);
    let app = spec(
        r#"{"ociVersion":"1.0.2","annotations":{"io.kubernetes.cri.container-type":"container"},
        "linux":{"namespaces":[{"type":"network","path":"/var/run/netns/p1"}]}}"#,
    );
    assert_eq!(netns_path(&app), Some(PathBuf::from("/var/run/netns/p1")));
}

#[test]
fn routes_and_the_choice_of_interface() {
    let route =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t01070A0A\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t00070A0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
";
    assert_eq!(
        default_gateway(route, "eth0"),
        Some(Ipv4Addr::new(10, 10, 7, 1))
    );
    assert_eq!(default_gateway(route, "eth1"), None);
    assert_eq!(default_route_iface(route).as_deref(), Some("eth0"));
    assert_eq!(default_route_iface("Iface\n"), None);

    let a = ("eth0".to_string(), Ipv4Addr::new(10, 10, 7, 2), 24);
    let b = ("net1".to_string(), Ipv4Addr::new(10, 20, 0, 2), 16);
    assert_eq!(choose(&[], None), Ok(None));
    assert_eq!(choose(std::slice::from_ref(&b), Some("eth0")), Ok(Some(&b)));
    let both = [a.clone(), b.clone()];
    assert_eq!(choose(&both, Some("net1")), Ok(Some(&b)));
    assert_eq!(choose(&both, None), Err("eth0, net1".to_string()));
}

#[test]
fn the_guest_takes_the_interface_s_mac_address_and_mtu() {
    let mut i = Iface {
        name: "eth0".into(),
        mac: [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x0b],
        address: Ipv4Addr::new(10, 244, 1, 11),
        prefix: 24,
        gateway: Some(Ipv4Addr::new(10, 244, 1, 1)),
        mtu: 1450,
    };
    assert_eq!(
        i.net_arg(),
        "tap=capsule0,mac=0a:58:0a:f4:01:0b,ip=10.244.1.11/24,gw=10.244.1.1,mtu=1450"
    );
    i.gateway = None;
    i.mtu = 65536;
    assert_eq!(
        i.net_arg(),
        "tap=capsule0,mac=0a:58:0a:f4:01:0b,ip=10.244.1.11/24"
    );
    let args: Vec<OsString> = ["exec", "--cpus", "1", "--", "sh", "--"]
        .iter()
        .map(OsString::from)
        .collect();
    let got = with_net_arg(args, "tap=x");
    let want: Vec<OsString> = ["exec", "--cpus", "1", "--net", "tap=x", "--", "sh", "--"]
        .iter()
        .map(OsString::from)
        .collect();
    assert_eq!(got, want);
}

/// A new, empty network namespace (made by a thread that then ends), if
/// this test may make TAPs: root, with /dev/net/tun.
fn fresh_netns() -> Option<File> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        return None;
    }
    let ns = std::thread::spawn(|| {
        // SAFETY: unshare of this thread's network namespace only.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        File::open("/proc/thread-self/ns/net").unwrap()
    })
    .join()
    .unwrap();
    Some(ns)
}

/// In a fresh network namespace of a thread (root only): only loopback,
/// so no pod interface; the TAP is created there, up, and removed, and
/// never seen in the test's own namespace.
#[test]
fn a_tap_is_made_and_removed_in_the_namespace() {
    let Some(ns) = fresh_netns() else {
        eprintln!("skipped: needs root and /dev/net/tun");
        return;
    };
    let path = Path::new("/proc/thread-self/ns/net");
    let name = "capsuletest0";
    in_netns(&ns, path, || {
        assert_eq!(sys::pod_iface(path).unwrap(), None);
        assert!(!sys::exists(name));
        sys::create_tap(name, 1400).unwrap();
        assert!(sys::exists(name));
    })
    .unwrap();
    assert!(!sys::exists(name), "the TAP is the namespace's, not ours");
    in_netns(&ns, path, || {
        // remove_tap waits out a copy of the TAP's descriptor held for a
        // moment by a child another test is spawning (EBUSY).
        sys::remove_tap(name).unwrap();
        // The kernel unregisters the device at the last close, inside it,
        // but give a busy machine a moment anyway.
        let gone = (0..200).any(|_| {
            let g = !sys::exists(name);
            if !g {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            g
        });
        assert!(gone, "the TAP is still there 2 s after remove_tap");
    })
    .unwrap();
}

/// A TAP held for a moment by another descriptor (a child that inherited
/// it and has not yet reached `exec`, in the shim or in these tests) is
/// still removed: remove_tap waits for the holder to let go.
#[test]
fn a_tap_held_for_a_moment_is_still_removed() {
    let Some(ns) = fresh_netns() else {
        eprintln!("skipped: needs root and /dev/net/tun");
        return;
    };
    let path = Path::new("/proc/thread-self/ns/net");
    let name = "capsuletest1";
    in_netns(&ns, path, || {
        sys::create_tap(name, 1400).unwrap();
        let holder = sys::attach_tap(name).unwrap();
        let start = std::time::Instant::now();
        std::thread::scope(|s| {
            s.spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(300));
                drop(holder);
            });
            sys::remove_tap(name).unwrap();
        });
        assert!(
            start.elapsed() >= std::time::Duration::from_millis(300),
            "removed while another descriptor held it"
        );
        assert!(!sys::exists(name));
    })
    .unwrap();
}
