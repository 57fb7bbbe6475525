//! CI proof that the bench still works: `twill-bench all --quick` into a temp dir, then the
//! results must hold every scenario with numbers. No timing thresholds: only that each
//! scenario ran to the end and measured something.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

const SCENARIOS: [&str; 11] = [
    "cni",
    "convergence",
    "coldstart",
    "footprint",
    "datapath",
    "backends",
    "etcd",
    "faults",
    "netpol",
    "kube",
    "dualstack",
];

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn number(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

#[test]
fn quick_run_measures_every_scenario() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("twill-bench-quick-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_twill-bench"))
        .args(["all", "--quick", "--out"])
        .arg(&dir.0)
        .output()
        .expect("run twill-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(dir.0.join("summary.json"))
        .unwrap_or_else(|e| panic!("no summary.json ({e}); stderr:\n{stderr}"));
    let summary: Value = serde_json::from_str(&text).expect("summary.json is JSON");
    assert!(
        out.status.success(),
        "twill-bench failed; stderr:\n{stderr}\n{text}"
    );
    assert_eq!(summary["quick"], true);
    assert!(summary["machine"]["nproc"].as_u64().unwrap_or(0) > 0);

    let scenarios = summary["scenarios"].as_array().expect("scenarios array");
    let names: Vec<&str> = scenarios
        .iter()
        .filter_map(|s| s["scenario"].as_str())
        .collect();
    assert_eq!(names, SCENARIOS);
    for s in scenarios {
        let name = s["scenario"].as_str().unwrap();
        assert!(s["error"].is_null(), "{name} failed: {}", s["error"]);
        let metrics = s["metrics"].as_array().expect("metrics array");
        assert!(!metrics.is_empty(), "{name} measured nothing");
        for m in metrics {
            let t = &m["twill"];
            for k in ["median", "p99", "min", "max"] {
                assert!(
                    number(&t[k]).is_some(),
                    "{name}/{}: twill.{k} missing: {m}",
                    m["name"]
                );
            }
            if !m["reference"].is_null() {
                assert!(
                    number(&m["reference"]["median"]).is_some(),
                    "{name}/{}: {m}",
                    m["name"]
                );
            }
        }
        // Each scenario also has its own JSON and Markdown.
        let own: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.0.join(format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(own["result"]["scenario"], name);
        let md = std::fs::read_to_string(dir.0.join(format!("{name}.md"))).unwrap();
        assert!(md.contains("| metric |"), "{name}.md has no table");
    }
    // The comparisons that matter have their reference measured in the same run.
    let cni = &scenarios[0]["metrics"][0];
    assert_eq!(cni["name"], "ADD sequential");
    assert!(number(&cni["ratio"]).is_some());
    let svg = std::fs::read_to_string(dir.0.join("cni_add.svg")).expect("ADD chart");
    assert!(svg.starts_with("<svg") && svg.contains("twill") && svg.contains("bridge+host-local"));
    // Network policy: all five parts, each against the reference measured beside it.
    let netpol = scenarios
        .iter()
        .find(|s| s["scenario"] == "netpol")
        .unwrap();
    let rows = netpol["metrics"].as_array().unwrap();
    for (prefix, compared) in [
        ("policy edit: write → enforced", true),
        ("peer label edit: write → enforced", true),
        ("target label edit: write → enforced", true),
        ("CNI ADD, unselected pod", true),
        ("CNI ADD, first of its kind here", true),
        ("TCP 1 stream", true),
        ("TCP connections", true),
        ("nft rules, ", true),
        ("set elements, ", true),
        ("twilld RSS, ", false),
    ] {
        let m = rows
            .iter()
            .find(|m| m["name"].as_str().unwrap_or("").starts_with(prefix))
            .unwrap_or_else(|| panic!("netpol has no '{prefix}' row"));
        if compared {
            assert!(number(&m["ratio"]).is_some(), "netpol/{prefix}: {m}");
        }
    }
    let notes = netpol["notes"].to_string();
    assert!(notes.contains("growth: pods"), "{notes}");
    assert!(notes.contains("not measured"), "{notes}");
}
