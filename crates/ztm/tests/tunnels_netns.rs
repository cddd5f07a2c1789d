//! A tunnel across NAT and firewalls: hub, router and two agents in network namespaces the
//! test creates (and removes). Needs root, iproute2 and nftables: ignored by default, and
//! scripts/test runs it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use ztm_testkit::netns::{in_ns, run, unavailable, veth, End, Namespaces};
use ztm_testkit::prelude::*;
use ztm_testkit::traffic::*;

/// B's service is reachable through A's port although A and B are each behind NAT with all
/// inbound traffic dropped, while a direct connection from A to B's service fails.
#[test]
#[ignore = "needs root, iproute2 and nftables (network namespaces); scripts/test runs it"]
fn tunnel_crosses_nat_and_firewalls_in_namespaces() {
    let dir = TempDir::new("tun-netns");
    if let Some(why) = unavailable(&["nft"]) {
        panic!("network namespaces with nftables are needed here: {why}");
    }
    let z = ztm!();
    let pid = std::process::id();
    let tag = format!("{pid}-{:x}", rand_u64() & 0xfff);
    let ns_hub = format!("ztm-t-{tag}-hub");
    let ns_rt = format!("ztm-t-{tag}-rt");
    let ns_a = format!("ztm-t-{tag}-a");
    let ns_b = format!("ztm-t-{tag}-b");
    // Dropped last: after every process below is gone.
    let _guard = Namespaces::create(&[&ns_hub, &ns_rt, &ns_a, &ns_b]);
    // Addresses that exist only inside these namespaces.
    let net = 10 + (pid % 200);
    let hub_ip = format!("10.{net}.1.2");
    let b_ip = format!("10.{net}.3.2");
    for (dev, ns, sub) in [("eh", &ns_hub, 1), ("ea", &ns_a, 2), ("eb", &ns_b, 3)] {
        veth(
            End {
                ns: &ns_rt,
                dev,
                addr: &format!("10.{net}.{sub}.1/24"),
            },
            End {
                ns,
                dev: "e0",
                addr: &format!("10.{net}.{sub}.2/24"),
            },
        );
        run(&format!(
            "ip -n {ns} route add default via 10.{net}.{sub}.1"
        ));
    }
    run(&format!(
        "ip netns exec {ns_rt} sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'"
    ));
    // The router masquerades A and B towards the hub and forwards nothing inbound; A and B
    // drop every inbound connection.
    let router_rules = "table ip ztmnat {\n\
         chain post {\n\
         type nat hook postrouting priority 100; policy accept;\n\
         oifname \"eh\" masquerade\n\
         }\n\
         }\n\
         table inet ztmfw {\n\
         chain forward {\n\
         type filter hook forward priority 0; policy drop;\n\
         ct state established,related accept\n\
         iifname \"ea\" oifname \"eh\" accept\n\
         iifname \"eb\" oifname \"eh\" accept\n\
         }\n\
         chain input {\n\
         type filter hook input priority 0; policy drop;\n\
         iif \"lo\" accept\n\
         ct state established,related accept\n\
         }\n\
         }\n";
    let host_rules = "table inet ztmfw {\n\
         chain input {\n\
         type filter hook input priority 0; policy drop;\n\
         iif \"lo\" accept\n\
         ct state established,related accept\n\
         }\n\
         }\n";
    let rr = write_file(dir.path(), "router.nft", router_rules);
    let hr = write_file(dir.path(), "host.nft", host_rules);
    run(&format!("ip netns exec {ns_rt} nft -f {rr}"));
    run(&format!("ip netns exec {ns_a} nft -f {hr}"));
    run(&format!("ip netns exec {ns_b} nft -f {hr}"));

    // CA and hub in the hub's namespace.
    let hub_addr = format!("{hub_ip}:7443");
    let (ca, hub, pem, root, bob) = in_ns(&ns_hub, || {
        let ca = z.start_ca(dir.path());
        let pem = ca_pem(&ca.addr);
        let root = create_user(&ca.addr, "root");
        let bob = create_user(&ca.addr, "bob");
        let hub = z.start_hub_on(dir.path(), "hub", &ca.addr, &hub_addr, &[]);
        (ca, hub, pem, root, bob)
    });
    // Agents in theirs, each on 127.0.0.1 there.
    let a = in_ns(&ns_a, || {
        let a = z.start_agent(dir.path(), "a");
        join_ok(&a.addr, &pem, "a", &root, &[&hub_addr]);
        a
    });
    let b = in_ns(&ns_b, || {
        let b = z.start_agent(dir.path(), "b");
        join_ok(&b.addr, &pem, "b", &bob, &[&hub_addr]);
        b
    });
    let a_id = in_ns(&ns_a, || local_id(&a.addr));
    let b_id = in_ns(&ns_b, || local_id(&b.addr));
    wait_until(Duration::from_secs(30), "A and B online", || {
        in_ns(&ns_a, || {
            is_online(&a.addr, &a_id) && is_online(&a.addr, &b_id)
        })
    });

    // B's backend listens on every address of B's namespace, so only the firewall stands
    // between it and A.
    let listener = in_ns(&ns_b, || TcpListener::bind("0.0.0.0:0").unwrap());
    let backend = serve(listener, tagged_handler("B"));
    in_ns(&ns_b, || {
        add_service_at(&b.addr, &b_id, "tcp", "svc", backend.port, None)
    });
    wait_until(Duration::from_secs(20), "A to discover tcp/svc", || {
        in_ns(&ns_a, || discovered(&a.addr, "tcp", "svc", &[&b_id]))
    });
    let port = in_ns(&ns_a, free_port);
    in_ns(&ns_a, || {
        map_port_at(&a.addr, &a_id, "tcp", port, "svc", None)
    });
    let mut last = String::new();
    let through = time_until(Duration::from_secs(20), || {
        match in_ns(&ns_a, || roundtrip(port, "ping")) {
            Ok(got) if got == "B:ping" => true,
            other => {
                last = format!("{other:?}");
                false
            }
        }
    });
    assert!(
        through.is_some(),
        "B's service is not reachable through A's port; last attempt: {last}"
    );
    for i in 0..5 {
        assert_eq!(
            in_ns(&ns_a, || roundtrip(port, &format!("p{i}"))).unwrap(),
            format!("B:p{i}")
        );
    }

    // The backend is there (B reaches it on its own address) ...
    let direct: SocketAddr = format!("{b_ip}:{}", backend.port).parse().unwrap();
    assert_eq!(
        in_ns(&ns_b, || roundtrip_addr(direct, "self")).unwrap(),
        "B:self"
    );
    // ... but neither A nor the hub can open a connection to it.
    let accepted = backend.accepted.load(Ordering::SeqCst);
    for ns in [&ns_a, &ns_hub] {
        let r = in_ns(ns, || {
            TcpStream::connect_timeout(&direct, Duration::from_secs(2))
        });
        assert!(
            r.is_err(),
            "a direct connection from {ns} to B's service at {direct} got through"
        );
    }
    assert_eq!(backend.accepted.load(Ordering::SeqCst), accepted);
    // And the tunnel still works.
    assert_eq!(in_ns(&ns_a, || roundtrip(port, "end")).unwrap(), "B:end");
    drop((a, b, hub, ca));
}
