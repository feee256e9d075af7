//! `mesh fetch` of a repo the Hub moved (renamed, or a one-part id such as `gpt2` that the Hub
//! moved under an org): it follows the Hub's redirect, as `huggingface-cli download` does, and
//! knows the model by its new id. The HF endpoint's side is in `hf_clients`.

use mesh_tests::util::*;

const REPO: &str = "new-org/model";

/// A repo the Hub renamed is fetched from its new id, as `huggingface-cli download` follows the
/// Hub's redirect, and is known by that id afterwards.
#[test]
fn a_renamed_repo_is_fetched_from_its_new_id() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    write_file(&repo.join("model.safetensors"), (1 << 20) + 5, 7);
    write_file(&repo.join("config.json"), 300, 8);
    let old = "old-org/model";
    let hub = FakeHub::start(
        tmp.path(),
        None,
        "127.0.0.1",
        &[
            "--repo",
            &format!("{REPO}={}", repo.display()),
            "--moved",
            &format!("{old}={REPO}"),
            "--moved",
            &format!("model={REPO}"),
        ],
    )
    .unwrap();
    let home = tmp.path().join("node");
    let mesh = |args: &[&str]| {
        let out = hub.mesh_cmd(&home).args(args).output().unwrap();
        print_output(&format!("mesh {}", args.join(" ")), &out);
        out
    };
    let out = tmp.path().join("out");
    let run = mesh(&["fetch", old, "--json", "--to", out.to_str().unwrap()]);
    assert!(run.status.success(), "fetch of a renamed repo failed");
    assert_same_tree(&repo, &out);
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert!(
        report["source"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{REPO}@")),
        "{report}"
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains(&format!("moved {old} to {REPO}")),
        "{stderr}"
    );
    // By its new id, the store has it: nothing more from HF.
    let size = hub.served_bytes();
    let out2 = tmp.path().join("out2");
    let again = mesh(&["fetch", REPO, "--json", "--to", out2.to_str().unwrap()]);
    assert!(again.status.success());
    assert_eq!(hub.served_bytes(), size, "the new id went to HF again");
    // A one-part id, as the Hub still redirects `gpt2`: with hf:// it is the Hub's.
    let one = mesh(&[
        "fetch",
        "hf://model",
        "--json",
        "--to",
        out2.to_str().unwrap(),
    ]);
    assert!(one.status.success(), "fetch of a one-part id failed");
    let report: serde_json::Value = serde_json::from_slice(&one.stdout).unwrap();
    assert_eq!(report["name"], REPO);
    assert_eq!(hub.served_bytes(), size, "the one-part id went to HF again");
}
