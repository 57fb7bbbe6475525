//! twill's fake Kubernetes API server (tests/src/fakeapi), proven with the real `kube` client
//! (kube 5.0, k8s-openapi 0.29) before twilld relies on it: list, get, watch with replay from a
//! resourceVersion, 410 and the watcher's relist, bookmarks, watch timeouts, merge and strategic
//! merge patches on nodes/status, RBAC from the shipped manifest, and every injected fault.
//! (A real kube-apiserver cannot run on these machines; see the fake's module doc.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, VersionMatch, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Client, Config, ResourceExt};
use serde_json::json;
use twill_tests::fakeapi::{Failure, FakeApi, FakeApiOptions, Kind};
use twill_tests::{netns, Lab, LabOptions};

/// A client configured the way twilld's --kubeconfig-file will be: from a kubeconfig.
async fn client(fake: &FakeApi, token: &str) -> Client {
    let kc = Kubeconfig::from_yaml(&fake.kubeconfig(token)).expect("kubeconfig parses");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is usable");
    Client::try_from(config).expect("client")
}

async fn twill_client(fake: &FakeApi) -> Client {
    let token = fake
        .twill_token()
        .expect("the manifest binds twill's ServiceAccount");
    client(fake, &token).await
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

fn three_nodes(fake: &FakeApi) {
    for i in 1..=3 {
        fake.add_node(
            &format!("n{i}"),
            &format!("198.18.0.1{i}"),
            Some(&format!("10.244.{i}.0/24")),
        )
        .unwrap();
    }
}

#[tokio::test]
async fn list_and_get_carry_resource_versions() {
    let fake = FakeApi::start_default().unwrap();
    three_nodes(&fake);
    let nodes: Api<Node> = Api::all(twill_client(&fake).await);
    let list = nodes.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        list.metadata.resource_version,
        Some(fake.resource_version().to_string())
    );
    let names: Vec<_> = list.items.iter().map(|n| n.name_any()).collect();
    assert_eq!(names, ["n1", "n2", "n3"]);
    for n in &list.items {
        assert!(n
            .resource_version()
            .is_some_and(|rv| rv.parse::<u64>().is_ok()));
    }
    let n2 = nodes.get("n2").await.unwrap();
    assert_eq!(n2.spec.unwrap().pod_cidr.as_deref(), Some("10.244.2.0/24"));
    let err = nodes.get("nope").await.unwrap_err();
    assert_eq!(api_code(&err), Some(404), "{err}");
    // Pages: all at one resourceVersion, whatever changes in between.
    let page = nodes.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(page.items.len(), 2);
    fake.delete(Kind::Node, "", "n3").unwrap();
    let rest = nodes
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(page.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(
        rest.items[0].name_any(),
        "n3",
        "the second page is served at the first's version"
    );
    assert_eq!(
        rest.metadata.resource_version,
        page.metadata.resource_version
    );
    // Selectors.
    fake.add_namespace("web", &[]).unwrap();
    fake.add_pod("web", "a", "n1", "10.244.1.2", &[("app", "a")])
        .unwrap();
    fake.add_pod("web", "b", "n2", "10.244.2.2", &[("app", "b")])
        .unwrap();
    let pods: Api<Pod> = Api::all(twill_client(&fake).await);
    let on_n2 = pods
        .list(&ListParams::default().fields("spec.nodeName=n2"))
        .await
        .unwrap();
    assert_eq!(
        on_n2.items.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["b"]
    );
    let app_a = pods
        .list(&ListParams::default().labels("app in (a,c)"))
        .await
        .unwrap();
    assert_eq!(
        app_a.items.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["a"]
    );
}

#[tokio::test]
async fn watch_replays_every_change_after_its_resource_version() {
    let fake = FakeApi::start_default().unwrap();
    three_nodes(&fake);
    let nodes: Api<Node> = Api::all(twill_client(&fake).await);
    let rv = nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    // Changes between the list and the watch: the gap a watcher must not lose.
    fake.add_node("n4", "198.18.0.14", None).unwrap();
    fake.set_pod_cidrs("n4", &["10.244.4.0/24"]).unwrap();
    fake.delete(Kind::Node, "", "n1").unwrap();
    let mut stream = nodes
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    for _ in 0..3 {
        match stream.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(n) => seen.push(format!("ADDED {}", n.name_any())),
            WatchEvent::Modified(n) => seen.push(format!(
                "MODIFIED {} {}",
                n.name_any(),
                n.spec.and_then(|s| s.pod_cidr).unwrap_or_default()
            )),
            WatchEvent::Deleted(n) => seen.push(format!("DELETED {}", n.name_any())),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seen,
        ["ADDED n4", "MODIFIED n4 10.244.4.0/24", "DELETED n1"]
    );
    // Then live changes.
    fake.wipe_annotations("n2").unwrap(); // no annotations: no change, no event
    fake.set_node_annotation("n2", "x/y", Some("z")).unwrap();
    match stream.try_next().await.unwrap().unwrap() {
        WatchEvent::Modified(n) => assert_eq!(n.annotations()["x/y"], "z"),
        other => panic!("unexpected {other:?}"),
    }
    // A field-selected watch sees only its object.
    let rv = fake.resource_version().to_string();
    let mut one = nodes
        .watch(
            &WatchParams::default()
                .fields("metadata.name=n3")
                .timeout(10),
            &rv,
        )
        .await
        .unwrap()
        .boxed();
    fake.heartbeat("n2").unwrap();
    fake.heartbeat("n3").unwrap();
    match one.try_next().await.unwrap().unwrap() {
        WatchEvent::Modified(n) => assert_eq!(n.name_any(), "n3"),
        other => panic!("unexpected {other:?}"),
    }
}

/// A kube-runtime watcher running as its own task (it only makes requests while polled), its
/// events as text.
struct Watch {
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    fn start(api: Api<Node>, cfg: watcher::Config) -> Watch {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut w = watcher(api, cfg).boxed();
            while let Some(ev) = w.next().await {
                let line = match ev {
                    Ok(watcher::Event::Init) => "Init".into(),
                    Ok(watcher::Event::InitApply(n)) => format!("InitApply {}", n.name_any()),
                    Ok(watcher::Event::InitDone) => "InitDone".into(),
                    Ok(watcher::Event::Apply(n)) => format!("Apply {}", n.name_any()),
                    Ok(watcher::Event::Delete(n)) => format!("Delete {}", n.name_any()),
                    Err(e) => format!("Err {e}"),
                };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Watch {
            rx,
            seen: Vec::new(),
            task,
        }
    }

    /// Wait (bounded) until the events seen so far satisfy `until`.
    async fn until(&mut self, until: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !until(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(line)) => self.seen.push(line),
                _ => panic!("watcher stalled; seen so far: {:?}", self.seen),
            }
        }
    }

    async fn until_seen(&mut self, line: &str) {
        self.until(|s| s.iter().any(|l| l == line)).await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Poll a condition without blocking the runtime the watcher task runs on.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "still not true after 15 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn compacted_versions_are_gone_and_the_watcher_relists() {
    let fake = FakeApi::start_default().unwrap();
    three_nodes(&fake);
    let nodes: Api<Node> = Api::all(twill_client(&fake).await);
    let old = fake.resource_version().to_string();
    fake.add_node("n4", "198.18.0.14", None).unwrap();
    let page = nodes.list(&ListParams::default().limit(1)).await.unwrap();
    fake.add_node("n5", "198.18.0.15", None).unwrap();
    fake.compact();
    // Watch from a compacted version: 200, then the ERROR event with 410, as the real server.
    let mut stream = nodes
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Error(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"), "{s:?}");
            assert!(s.message.contains("too old resource version"), "{s:?}");
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        stream.try_next().await.unwrap().is_none(),
        "the stream ends after the error"
    );
    // Lists: an Exact list at a compacted version, and a continue token from before.
    let exact = ListParams::default().at(&old).matching(VersionMatch::Exact);
    assert_eq!(api_code(&nodes.list(&exact).await.unwrap_err()), Some(410));
    let cont = ListParams::default().continue_token(page.metadata.continue_.as_deref().unwrap());
    assert_eq!(api_code(&nodes.list(&cont).await.unwrap_err()), Some(410));
    // NotOlderThan (the default) at an old version is served, as from the watch cache.
    assert_eq!(
        nodes
            .list(&ListParams::default().at(&old))
            .await
            .unwrap()
            .items
            .len(),
        5
    );

    // The watcher: cut while a change happens, compacted past its version: it gets 410 and
    // lists again, and the relist shows the change.
    let mut w = Watch::start(nodes.clone(), watcher::Config::default().timeout(20));
    w.until_seen("InitDone").await;
    assert_eq!(
        fake.count("list", "nodes"),
        5,
        "four lists above and the watcher's"
    );
    eventually("the watch is open", || fake.open_watches() > 0).await;
    fake.go_down().unwrap();
    fake.add_node("n6", "198.18.0.16", None).unwrap();
    fake.compact();
    fake.come_back().unwrap();
    w.seen.clear();
    w.until_seen("InitDone").await;
    assert!(
        w.seen[0].contains("too old resource version"),
        "410 first: {:?}",
        w.seen
    );
    assert!(w.seen[..].contains(&"Init".to_string()), "{:?}", w.seen);
    assert!(w.seen.contains(&"InitApply n6".to_string()), "{:?}", w.seen);
    assert_eq!(fake.count("list", "nodes"), 6, "one relist: {:?}", w.seen);
}

#[tokio::test]
async fn bookmarks_keep_a_resumed_watch_from_relisting() {
    let fake = FakeApi::start(FakeApiOptions {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .unwrap();
    three_nodes(&fake);
    fake.add_namespace("busy", &[]).unwrap();
    let nodes: Api<Node> = Api::all(twill_client(&fake).await);
    // A raw watch: bookmarks carry the current version, also when only other kinds changed.
    let rv = fake.resource_version().to_string();
    fake.add_pod("busy", "p", "n1", "10.244.1.9", &[]).unwrap();
    let now = fake.resource_version().to_string();
    let mut s = nodes
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .unwrap()
        .boxed();
    match s.try_next().await.unwrap().unwrap() {
        WatchEvent::Bookmark(b) => assert_eq!(b.metadata.resource_version, now),
        other => panic!("expected a bookmark, got {other:?}"),
    }
    drop(s);
    // Without bookmarks (asked for none): none come.
    let mut quiet = nodes
        .watch(
            &WatchParams {
                bookmarks: false,
                timeout: Some(1),
                ..Default::default()
            },
            &now,
        )
        .await
        .unwrap()
        .boxed();
    assert!(
        quiet.try_next().await.unwrap().is_none(),
        "no event, the stream just times out"
    );

    // kube's watcher with and without bookmarks, while other kinds churn and the log is
    // compacted: with them it resumes where the bookmark left it; without, 410 and a relist.
    for bookmarks in [true, false] {
        fake.clear_requests();
        let cfg = watcher::Config {
            bookmarks,
            ..watcher::Config::default().timeout(20)
        };
        let mut w = Watch::start(nodes.clone(), cfg);
        w.until_seen("InitDone").await;
        w.seen.clear();
        eventually("the watch is open", || fake.open_watches() > 0).await;
        for i in 0..5 {
            fake.add_pod(
                "busy",
                &format!("churn-{bookmarks}-{i}"),
                "n1",
                "10.244.1.10",
                &[],
            )
            .unwrap();
        }
        // Long enough for a bookmark to reach the watcher.
        tokio::time::sleep(Duration::from_millis(800)).await;
        fake.compact();
        fake.drop_watches();
        fake.heartbeat("n1").unwrap();
        w.until(|s| s.iter().any(|l| l == "Apply n1" || l == "InitApply n1"))
            .await;
        let seen = w.seen.clone();
        let lists = fake.count("list", "nodes");
        if bookmarks {
            assert_eq!(
                lists, 1,
                "resumed from the bookmark without a relist: {seen:?}"
            );
            assert!(seen.contains(&"Apply n1".to_string()), "{seen:?}");
        } else {
            assert_eq!(
                lists, 2,
                "no bookmark: its version was compacted, so it relisted: {seen:?}"
            );
        }
    }
}

#[tokio::test]
async fn watch_timeout_ends_the_stream() {
    let fake = FakeApi::start_default().unwrap();
    let nodes: Api<Node> = Api::all(twill_client(&fake).await);
    let started = Instant::now();
    let mut s = nodes
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .boxed();
    assert!(s.try_next().await.unwrap().is_none());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(fake
        .requests()
        .iter()
        .any(|r| r.verb == "watch" && r.query.contains("timeoutSeconds=1")));
}

#[tokio::test]
async fn status_patches_merge_like_the_real_server_and_no_ops_cost_nothing() {
    let fake = FakeApi::start_default().unwrap();
    three_nodes(&fake);
    let nodes: Api<Node> = Api::all(twill_client(&fake).await);
    let pp = PatchParams::default();
    // Annotations, as flannel publishes them: a merge patch on nodes/status.
    let ann = json!({"metadata": {"annotations": {
        "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"12:c6:65:89:b4:e3\"}",
        "flannel.alpha.coreos.com/public-ip": "198.18.0.11"}}});
    let n = nodes
        .patch_status("n1", &pp, &Patch::Merge(&ann))
        .await
        .unwrap();
    assert_eq!(
        n.annotations()["flannel.alpha.coreos.com/public-ip"],
        "198.18.0.11"
    );
    // NetworkUnavailable=False by strategic merge: kubelet's Ready condition stays.
    let cond = json!({"status": {"conditions": [{"type": "NetworkUnavailable", "status": "False",
        "reason": "TwillIsUp", "message": "twill is running on this node",
        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    let n = nodes
        .patch_status("n1", &pp, &Patch::Strategic(&cond))
        .await
        .unwrap();
    let types: Vec<_> = n
        .status
        .unwrap()
        .conditions
        .unwrap()
        .iter()
        .map(|c| c.type_.clone())
        .collect();
    assert_eq!(types, ["Ready", "NetworkUnavailable"]);
    // The same body again changes nothing: no new resourceVersion, no watch event.
    let rv = fake.resource_version();
    let watch_from = rv.to_string();
    let n = nodes
        .patch_status("n1", &pp, &Patch::Strategic(&cond))
        .await
        .unwrap();
    nodes
        .patch_status("n1", &pp, &Patch::Merge(&ann))
        .await
        .unwrap();
    assert_eq!(fake.resource_version(), rv);
    assert_eq!(n.resource_version(), Some(rv.to_string()));
    let mut s = nodes
        .watch(&WatchParams::default().timeout(1), &watch_from)
        .await
        .unwrap()
        .boxed();
    assert!(
        s.try_next().await.unwrap().is_none(),
        "no event for a no-op patch"
    );
    // A merge patch of conditions replaces the list (why twilld must use strategic merge).
    let n = nodes
        .patch_status("n2", &pp, &Patch::Merge(&cond))
        .await
        .unwrap();
    assert_eq!(n.status.unwrap().conditions.unwrap().len(), 1);
    // Through status, spec does not change; podCIDRs merge as a set through the main resource
    // (as the admin; twill may not patch it).
    let admin: Api<Node> = Api::all(client(&fake, fake.admin_token()).await);
    let n = admin
        .patch_status(
            "n3",
            &pp,
            &Patch::Strategic(json!({"spec": {"podCIDR": "10.9.9.0/24"}})),
        )
        .await
        .unwrap();
    assert_eq!(n.spec.unwrap().pod_cidr.as_deref(), Some("10.244.3.0/24"));
    let n = admin
        .patch(
            "n3",
            &pp,
            &Patch::Strategic(json!({"spec": {"podCIDRs": ["fd00:3::/64"]}})),
        )
        .await
        .unwrap();
    assert_eq!(
        n.spec.unwrap().pod_cidrs.unwrap(),
        ["10.244.3.0/24", "fd00:3::/64"]
    );
    // Recorded: what twill sent, with its content types.
    let p: Vec<_> = fake
        .node_patches("n1")
        .iter()
        .map(|p| {
            (
                p.subresource.clone().unwrap_or_default(),
                p.content_type.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        p,
        [
            ("status".into(), "application/merge-patch+json".into()),
            (
                "status".into(),
                "application/strategic-merge-patch+json".into()
            ),
            (
                "status".into(),
                "application/strategic-merge-patch+json".into()
            ),
            ("status".into(), "application/merge-patch+json".into()),
        ]
    );
    assert_eq!(fake.count("patch", "nodes/status"), 6);
    // A stale resourceVersion in the patch is a conflict; a wrong type is refused.
    let stale = json!({"metadata": {"resourceVersion": "1", "annotations": {"a": "b"}}});
    assert_eq!(
        api_code(
            &nodes
                .patch_status("n1", &pp, &Patch::Merge(&stale))
                .await
                .unwrap_err()
        ),
        Some(409)
    );
    let bad = json!({"status": {"conditions": "not a list"}});
    assert_eq!(
        api_code(
            &nodes
                .patch_status("n1", &pp, &Patch::Merge(&bad))
                .await
                .unwrap_err()
        ),
        Some(422)
    );
    // Server-side apply is not served (415), so no test can lean on it by accident.
    let apply =
        Patch::Apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}));
    let err = nodes
        .patch_status("n1", &PatchParams::apply("t"), &apply)
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some(415));
}

#[tokio::test]
async fn rbac_grants_exactly_the_shipped_cluster_role() {
    let fake = FakeApi::start_default().unwrap();
    three_nodes(&fake);
    fake.add_namespace("web", &[("team", "a")]).unwrap();
    fake.add_pod("web", "p", "n1", "10.244.1.5", &[]).unwrap();
    let c = twill_client(&fake).await;
    let nodes: Api<Node> = Api::all(c.clone());
    let pods: Api<Pod> = Api::all(c.clone());
    let lp = ListParams::default();
    // Granted: what twilld needs.
    nodes.get("n1").await.unwrap();
    nodes.list(&lp).await.unwrap();
    let _ = nodes
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap();
    let ann = Patch::Merge(json!({"metadata": {"annotations": {"a": "b"}}}));
    nodes
        .patch_status("n1", &PatchParams::default(), &ann)
        .await
        .unwrap();
    pods.list(&lp).await.unwrap();
    Api::<Pod>::namespaced(c.clone(), "web")
        .get("p")
        .await
        .unwrap();
    Api::<Namespace>::all(c.clone()).list(&lp).await.unwrap();
    Api::<NetworkPolicy>::all(c.clone())
        .list(&lp)
        .await
        .unwrap();
    let _ = Api::<NetworkPolicy>::all(c.clone())
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap();
    // Refused: everything else, with the real authorizer's Status.
    let err = nodes
        .patch("n1", &PatchParams::default(), &ann)
        .await
        .unwrap_err();
    let kube::Error::Api(s) = &err else {
        panic!("{err}")
    };
    assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        s.message,
        "nodes \"n1\" is forbidden: User \"system:serviceaccount:twill-system:twill\" cannot patch \
         resource \"nodes\" in API group \"\" at the cluster scope"
    );
    let denied = [
        api_code(
            &nodes
                .delete("n1", &DeleteParams::default())
                .await
                .unwrap_err(),
        ),
        api_code(
            &nodes
                .create(&Default::default(), &Node::default())
                .await
                .unwrap_err(),
        ),
        api_code(
            &nodes
                .replace_status(
                    "n1",
                    &Default::default(),
                    &fake.get::<Node>("", "n1").unwrap(),
                )
                .await
                .unwrap_err(),
        ),
        api_code(
            &Api::<Namespace>::all(c.clone())
                .get("web")
                .await
                .unwrap_err(),
        ),
        api_code(
            &Api::<Pod>::namespaced(c.clone(), "web")
                .patch("p", &PatchParams::default(), &ann)
                .await
                .unwrap_err(),
        ),
        api_code(
            &Api::<NetworkPolicy>::namespaced(c.clone(), "web")
                .get("x")
                .await
                .unwrap_err(),
        ),
        api_code(
            &Api::<k8s_openapi::api::core::v1::ConfigMap>::all(c.clone())
                .list(&lp)
                .await
                .unwrap_err(),
        ),
    ];
    assert_eq!(denied, [Some(403); 7]);
    assert_eq!(
        fake.get::<Node>("", "n1")
            .unwrap()
            .annotations()
            .get("a")
            .map(String::as_str),
        Some("b")
    );
    // No token, or an unknown one: 401.
    let anon: Api<Node> = Api::all(client(&fake, "not-a-token").await);
    assert_eq!(api_code(&anon.list(&lp).await.unwrap_err()), Some(401));
    // An identity with no rules gets nothing.
    let none: Api<Node> = Api::all(client(&fake, &fake.add_identity("nobody", vec![])).await);
    assert_eq!(api_code(&none.get("n1").await.unwrap_err()), Some(403));
}

#[tokio::test]
async fn injected_failures_and_retry_after() {
    let fake = FakeApi::start_default().unwrap();
    three_nodes(&fake);
    let nodes: Api<Node> = Api::all(twill_client(&fake).await);
    // 500: surfaced to the caller (kube does not retry it), then served again.
    fake.fail_next(1, Failure::Internal);
    let err = nodes.get("n1").await.unwrap_err();
    assert_eq!(api_code(&err), Some(500), "{err}");
    nodes.get("n1").await.unwrap();
    // 429 with Retry-After: kube's default retry policy waits as told and gets through.
    fake.clear_requests();
    fake.fail_next(2, Failure::TooManyRequests { retry_after: 1 });
    let started = Instant::now();
    nodes.get("n1").await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    let codes: Vec<u16> = fake.requests().iter().map(|r| r.code).collect();
    assert_eq!(codes, [429, 429, 200]);
}

#[tokio::test]
async fn stall_down_and_dropped_watches() {
    let fake = FakeApi::start_default().unwrap();
    three_nodes(&fake);
    let nodes: Api<Node> = Api::all(twill_client(&fake).await);
    // Stall: the request is taken and never answered.
    fake.stall_for(Duration::from_secs(2));
    assert!(
        tokio::time::timeout(Duration::from_millis(800), nodes.get("n1"))
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes.get("n1").await.unwrap();
    assert!(
        fake.requests().iter().any(|r| r.code == 0),
        "the stalled request is recorded unanswered"
    );

    // A watcher through dropped streams and an outage: it resumes from its last version,
    // without relisting, and sees what changed meanwhile.
    fake.clear_requests();
    let mut w = Watch::start(nodes.clone(), watcher::Config::default().timeout(20));
    w.until_seen("InitDone").await;
    eventually("the watch is open", || fake.open_watches() > 0).await;
    fake.drop_watches();
    fake.add_node("after-drop", "198.18.0.20", None).unwrap();
    w.until_seen("Apply after-drop").await;
    eventually("the watch is open again", || fake.open_watches() > 0).await;
    fake.go_down().unwrap();
    assert!(
        std::net::TcpStream::connect_timeout(&fake.addr(), Duration::from_secs(1)).is_err(),
        "down: nothing listens"
    );
    fake.add_node("while-down", "198.18.0.21", None).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fake.come_back().unwrap();
    w.until_seen("Apply while-down").await;
    assert_eq!(fake.count("list", "nodes"), 1, "{:?}", w.seen);
    assert!(fake.count("watch", "nodes") >= 3, "{:?}", w.seen);
}

#[test]
fn serves_inside_a_lab_underlay_to_clients_in_node_namespaces() {
    let lab = Lab::new(LabOptions {
        nodes: 1,
        etcd: false,
        ..Default::default()
    })
    .unwrap();
    let fake = FakeApi::start(FakeApiOptions::in_lab(&lab)).unwrap();
    assert_eq!(fake.addr().ip().to_string(), "198.18.0.1");
    fake.add_node("n1", "198.18.0.11", Some("10.244.1.0/24"))
        .unwrap();
    // Not reachable from this (the machine's own) namespace: it lives in the lab's.
    assert!(
        std::net::TcpStream::connect_timeout(&fake.addr(), Duration::from_millis(500)).is_err()
    );
    let (code, body) =
        twill_tests::http::get_in_netns(&lab.node_ns(1), fake.addr(), "/version").unwrap();
    assert_eq!(code, 200, "{body}");
    // The kube client from inside the node's namespace, as twilld will run there.
    let kubeconfig = fake.kubeconfig(&fake.twill_token().unwrap());
    let names = netns::in_netns(&lab.node_ns(1), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let kc = Kubeconfig::from_yaml(&kubeconfig).unwrap();
            let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .unwrap();
            let nodes: Api<Node> = Api::all(Client::try_from(config).unwrap());
            let list = nodes.list(&ListParams::default()).await.unwrap();
            list.items.iter().map(|n| n.name_any()).collect::<Vec<_>>()
        })
    })
    .unwrap();
    assert_eq!(names, ["n1"]);
    drop(fake);
    drop(lab);
}

#[test]
fn binary_serves_with_kubeconfigs_and_controls() {
    let dir = std::env::temp_dir().join(format!("twill-fakeapi-bin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("seed.yaml"),
        "apiVersion: v1\nkind: Node\nmetadata: {name: seeded}\nspec: {podCIDR: 10.244.9.0/24}\n",
    )
    .unwrap();
    struct Kill(std::process::Child, std::path::PathBuf);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_twill-fakeapi"))
        .args(["--listen", "127.0.0.1:0", "--kubeconfig-dir"])
        .arg(&dir)
        .arg("--seed")
        .arg(dir.join("seed.yaml"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Kill(child, dir.clone());
    twill_tests::wait_until(Duration::from_secs(30), || {
        dir.join("twill.kubeconfig").exists()
    })
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let read = |f: &str| {
            let kc = Kubeconfig::read_from(dir.join(f)).unwrap();
            async move {
                Client::try_from(
                    Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                        .await
                        .unwrap(),
                )
                .unwrap()
            }
        };
        let twill: Api<Node> = Api::all(read("twill.kubeconfig").await);
        let names: Vec<_> = twill
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(|n| n.name_any())
            .collect();
        assert_eq!(names, ["seeded"]);
        // The admin's controls: the next request fails with 500.
        let admin = read("admin.kubeconfig").await;
        let req = http::Request::post("/fake/v1/fail?count=1&code=500")
            .body(Vec::new())
            .unwrap();
        let ok: BTreeMap<String, String> = admin.request(req).await.unwrap();
        assert_eq!(ok["ok"], "fail");
        assert_eq!(api_code(&twill.get("seeded").await.unwrap_err()), Some(500));
        twill.get("seeded").await.unwrap();
    });
}
