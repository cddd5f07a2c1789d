//! Lists in pieces (PROTOCOL.md, "Lists"): a hub's endpoint and service lists searched and
//! paged with `?q=&offset=&limit=` and counted in `ztm-total`, its answer for one service, and
//! the same query on an agent's REST API. Many endpoints are registered by hand-made clients
//! (one control connection each), so that the pages have something to cut.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use ztm_testkit::hostile::*;
use ztm_testkit::prelude::*;

const ENDPOINTS: usize = 25;

/// `GET path` on a control connection: status, `ztm-total` (if any) and the JSON body.
async fn list(c: &Control, path: &str) -> (u16, Option<usize>, Value) {
    let a = call(&c.sender, "GET", path, &[], Bytes::new())
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let total = a
        .headers
        .get(ztm_proto::wire::TOTAL_HEADER)
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (a.status, total, a.json())
}

/// The `name` of each item of a JSON list.
fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

fn node(i: usize) -> String {
    format!("node-{i:02}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_and_agent_lists_come_in_pieces() {
    let ztm = ztm!();
    let dir = TempDir::new("listing");
    let ca = ztm.start_ca(dir.path());
    let pem = ca_pem(&ca.addr);
    let (alice, bob, carol) = tokio::task::block_in_place(|| {
        (
            create_user(&ca.addr, "alice"),
            create_user(&ca.addr, "bob"),
            create_user(&ca.addr, "carol"),
        )
    });
    let hub = ztm.start_hub(dir.path(), "hub", &ca.addr);

    // Alice's endpoints node-00 … node-24, each publishing tcp/svc-NN; the first three also
    // publish tcp/private, for carol only.
    let mut held = Vec::new();
    let mut ids = Vec::new();
    for i in 0..ENDPOINTS {
        let c = control(&hub.addr, &pem, &alice).await;
        let ident = Ident::of("alice");
        let mut services = vec![json!({"protocol": "tcp", "name": format!("svc-{i:02}")})];
        if i < 3 {
            services.push(json!({"protocol": "tcp", "name": "private", "users": ["carol"]}));
        }
        let r = register(&c.sender, &ident, &node(i), Value::from(services))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "register {}: {}", node(i), r.body);
        ids.push(ident.id);
        held.push(c);
    }
    let all: Vec<String> = (0..ENDPOINTS).map(node).collect();

    let b = control(&hub.addr, &pem, &bob).await;
    let c = control(&hub.addr, &pem, &carol).await;
    // The hub's lists follow registrations shortly after.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, total, _) = list(&b, "/api/endpoints?limit=1").await;
        if total == Some(ENDPOINTS) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hub lists {total:?} endpoints, not {ENDPOINTS}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Without a query: the whole list, sorted by name, and no count.
    let (status, total, whole) = list(&b, "/api/endpoints").await;
    assert_eq!((status, total), (200, None), "{whole}");
    assert_eq!(names(&whole), all);

    // Pages of 10 put together give the whole list, each with the count of all.
    let mut paged = Vec::new();
    for (offset, len) in [(0, 10), (10, 10), (20, 5)] {
        let (status, total, page) =
            list(&b, &format!("/api/endpoints?offset={offset}&limit=10")).await;
        assert_eq!((status, total), (200, Some(ENDPOINTS)), "{page}");
        assert_eq!(names(&page).len(), len, "offset {offset}: {page}");
        paged.extend(names(&page));
    }
    assert_eq!(paged, all);
    let (status, total, page) = list(&b, "/api/endpoints?offset=30&limit=5").await;
    assert_eq!((status, total, page), (200, Some(ENDPOINTS), json!([])));

    // A search ignores case and looks at names, users and ids.
    let (_, total, page) = list(&b, "/api/endpoints?q=NODE-1").await;
    assert_eq!(total, Some(10));
    assert_eq!(names(&page), (10..20).map(node).collect::<Vec<_>>());
    let (_, total, page) = list(&b, "/api/endpoints?q=alice&limit=3").await;
    assert_eq!((total, names(&page)), (Some(ENDPOINTS), all[..3].to_vec()));
    let (_, total, page) = list(&b, &format!("/api/endpoints?q={}", ids[7])).await;
    assert_eq!((total, names(&page)), (Some(1), vec![node(7)]));
    let (_, total, page) = list(&b, "/api/endpoints?q=nobody+here").await;
    assert_eq!((total, page), (Some(0), json!([])));
    // Other users do not see where alice's computers are, in a page as in the whole list.
    let (_, _, page) = list(&b, "/api/endpoints?q=node-0&limit=1").await;
    assert_eq!(
        (page[0]["ip"].as_str(), page[0]["port"].as_u64()),
        (Some(""), Some(0)),
        "{page}"
    );

    // A query the hub cannot read is refused, with the reason.
    for bad in ["limit=0", "limit=10001", "limit=ten", "offset=-1", "q=%FF"] {
        for what in ["endpoints", "services"] {
            let a = call(
                &b.sender,
                "GET",
                &format!("/api/{what}?{bad}"),
                &[],
                Bytes::new(),
            )
            .await
            .unwrap();
            assert_eq!(a.status, 400, "{what}?{bad}: {}", a.body);
            assert!(
                !a.json()["message"].as_str().unwrap_or("").is_empty(),
                "{what}?{bad}: {}",
                a.body
            );
        }
    }

    // Services: bob does not see the one only carol may use, in a page or by name.
    let (_, total, page) = list(&b, "/api/services?q=svc-0&limit=4").await;
    assert_eq!(total, Some(10));
    assert_eq!(names(&page), ["svc-00", "svc-01", "svc-02", "svc-03"]);
    let (_, total, page) = list(&b, "/api/services?q=private").await;
    assert_eq!((total, page), (Some(0), json!([])));
    let (_, total, _) = list(&b, "/api/services?limit=1").await;
    assert_eq!(total, Some(ENDPOINTS));
    let (_, total, page) = list(&c, "/api/services?q=private").await;
    assert_eq!(total, Some(1));
    assert_eq!(
        page[0]["endpoints"].as_array().map(Vec::len),
        Some(3),
        "{page}"
    );
    // A provider's name or user finds its services too.
    let (_, total, page) = list(&b, "/api/services?q=node-07").await;
    assert_eq!((total, names(&page)), (Some(1), vec!["svc-07".to_string()]));

    // One service by name.
    let (status, _, one) = list(&b, "/api/services/tcp/svc-05").await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["name"], "svc-05");
    assert_eq!(one["endpoints"][0]["id"], ids[5].as_str(), "{one}");
    let (status, _, one) = list(&b, "/api/services/tcp/private").await;
    assert_eq!(status, 404, "bob must not find carol's service: {one}");
    let (status, _, one) = list(&c, "/api/services/tcp/private").await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["endpoints"].as_array().map(Vec::len), Some(3), "{one}");
    let (status, _, one) = list(&b, "/api/services/tcp/nosuch").await;
    assert_eq!(status, 404, "{one}");
    let (status, _, one) = list(&b, "/api/services/udp/svc-05").await;
    assert_eq!(status, 404, "{one}");
    let (status, _, one) = list(&b, "/api/services/sctp/svc-05").await;
    assert_eq!(status, 400, "{one}");

    // An agent's REST API answers the same queries for its mesh, from its hubs' lists.
    let agent = ztm.start_agent(dir.path(), "agent");
    tokio::task::block_in_place(|| {
        join_ok(&agent.addr, &pem, "mine", &bob, &[&hub.addr]);
        let base = format!("/api/meshes/{MESH}");
        wait_until(
            Duration::from_secs(20),
            "the agent lists every endpoint",
            || {
                let r = get(&agent.addr, &format!("{base}/endpoints?limit=1"));
                r.header(ztm_proto::wire::TOTAL_HEADER) == Some("26")
            },
        );
        let r = get(
            &agent.addr,
            &format!("{base}/endpoints?q=node-2&offset=1&limit=3"),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header(ztm_proto::wire::TOTAL_HEADER), Some("5"));
        assert_eq!(names(&r.json()), ["node-21", "node-22", "node-23"]);
        let r = get(&agent.addr, &format!("{base}/endpoints"));
        assert_eq!(r.header(ztm_proto::wire::TOTAL_HEADER), None);
        assert_eq!(r.json().as_array().map(Vec::len), Some(ENDPOINTS + 1));
        let r = get(&agent.addr, &format!("{base}/services?q=svc-2&limit=2"));
        assert_eq!(r.header(ztm_proto::wire::TOTAL_HEADER), Some("5"));
        assert_eq!(names(&r.json()), ["svc-20", "svc-21"]);
        // A provider's user finds its services at the agent too.
        let r = get(&agent.addr, &format!("{base}/services?q=ALICE&limit=2"));
        assert_eq!(
            r.header(ztm_proto::wire::TOTAL_HEADER),
            Some("25"),
            "{}",
            r.text()
        );
        assert_eq!(
            r.json()[0]["endpoints"][0]["username"],
            "alice",
            "{}",
            r.text()
        );
        let r = get(&agent.addr, &format!("{base}/services?q=private"));
        assert_eq!(r.header(ztm_proto::wire::TOTAL_HEADER), Some("0"));
        // One service by name, from each hub's answer for that service.
        let r = get(&agent.addr, &format!("{base}/services/tcp/svc-05"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["endpoints"][0]["name"], "node-05", "{}", r.text());
        assert_eq!(
            r.json()["endpoints"][0]["username"],
            "alice",
            "{}",
            r.text()
        );
        let r = get(&agent.addr, &format!("{base}/services/tcp/private"));
        assert_eq!(
            r.status,
            404,
            "bob's agent must not find carol's service: {}",
            r.text()
        );
        for bad in ["limit=0", "offset=x"] {
            let r = get(&agent.addr, &format!("{base}/endpoints?{bad}"));
            assert_eq!(r.status, 400, "{bad}: {}", r.text());
        }
    });
    drop(held);
}
