//! Issue G (part): where apps look. Bundles spanning several sources with their links, the
//! built-in seed bundle, files already in place adopted instead of fetched, app layouts, and
//! never writing through a symlink that leaves the target. Real `mesh` processes against
//! `fake-hf` (the strict HuggingFace stand-in) and against each other.

use std::{
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Output,
};

use mesh_tests::util::*;

const SD: &str = "stabilityai/stable-diffusion-3.5-large";
const T5: &str = "mcmonkey/google_t5-v1_1-xxl_encoderonly";
const LTX: &str = "Lightricks/LTX-Video";

/// Small stand-ins for the seed's four... three repos (the SD3.5 repo holds three of the
/// files), with the real file names.
fn make_repos(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let sd = dir.join("sd");
    write_file(&sd.join("sd3.5_large.safetensors"), (2 << 20) + 11, 1);
    write_file(&sd.join("text_encoders/clip_g.safetensors"), 300_000, 2);
    write_file(&sd.join("text_encoders/t5xxl_fp16.safetensors"), 500_001, 3);
    write_file(&sd.join("model_index.json"), 400, 4);
    let t5 = dir.join("t5");
    write_file(&t5.join("t5xxl_fp8_e4m3fn.safetensors"), 200_003, 5);
    let ltx = dir.join("ltx");
    write_file(
        &ltx.join("ltxv-13b-0.9.7-distilled-fp8.safetensors"),
        (1 << 20) + 7,
        6,
    );
    vec![(SD, sd), (T5, t5), (LTX, ltx)]
}

fn serve(tmp: &Path, repos: &[(&str, PathBuf)]) -> FakeHub {
    let mut args = Vec::new();
    for (id, dir) in repos {
        args.push("--repo".to_string());
        args.push(format!("{id}={}", dir.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    FakeHub::start(tmp, None, "127.0.0.1", &args).unwrap()
}

/// `mesh ARGS` with the fake Hub as `HF_ENDPOINT`.
fn run(hub: &FakeHub, home: &Path, args: &[&str]) -> Output {
    let out = mesh_cmd(home, None, None)
        .env("HF_ENDPOINT", &hub.endpoint)
        .args(args)
        .output()
        .unwrap();
    print_output(&format!("mesh {}", args.join(" ")), &out);
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

fn same(a: &Path, b: &Path) {
    assert!(
        std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
        "{} differs from {}",
        a.display(),
        b.display()
    );
}

fn find(root: &Path) -> String {
    let out = std::process::Command::new("find")
        .arg(root)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_seed_bundle_lands_where_swarmui_and_comfyui_look() {
    let tmp = tempfile::tempdir().unwrap();
    let repos = make_repos(&tmp.path().join("repos"));
    let hub = serve(tmp.path(), &repos);
    let home = tmp.path().join("node");
    let root = tmp.path().join("opt/ai4artsed/SwarmUI");
    let r = root.to_str().unwrap();

    let plan = run(
        &hub,
        &home,
        &["fetch", "ai4artsed", "--root", r, "--dry-run"],
    );
    assert!(plan.status.success());
    let plan_text = String::from_utf8_lossy(&plan.stdout);
    let plan_json = json(&run(
        &hub,
        &home,
        &["fetch", "ai4artsed", "--root", r, "--dry-run", "--json"],
    ));
    let files: Vec<&serde_json::Value> = plan_json["entries"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["files"].as_array().unwrap())
        .collect();
    assert_eq!(files.len(), 5, "{plan_json}");
    for f in &files {
        assert_eq!(f["origin"], "hf");
        assert!(
            plan_text.contains(f["path"].as_str().unwrap()),
            "{plan_text}"
        );
    }
    assert!(!root.join("Models").exists(), "a dry run wrote files");

    let done = run(&hub, &home, &["fetch", "ai4artsed", "--root", r, "--json"]);
    assert!(done.status.success(), "the seed bundle failed");
    eprintln!("{}", find(&root));
    let sd = &repos[0].1;
    let models = root.join("Models/Stable-Diffusion/OfficialStableDiffusion");
    let comfy = root.join("dlbackend/ComfyUI/models");
    same(
        &models.join("sd3.5_large.safetensors"),
        &sd.join("sd3.5_large.safetensors"),
    );
    same(
        &comfy.join("clip/clip_g.safetensors"),
        &sd.join("text_encoders/clip_g.safetensors"),
    );
    same(
        &comfy.join("clip/t5xxl_fp16.safetensors"),
        &sd.join("text_encoders/t5xxl_fp16.safetensors"),
    );
    same(
        &comfy.join("clip/t5xxl_enconly.safetensors"),
        &repos[1].1.join("t5xxl_fp8_e4m3fn.safetensors"),
    );
    same(
        &comfy.join("checkpoints/ltxv-13b-0.9.7-distilled-fp8.safetensors"),
        &repos[2].1.join("ltxv-13b-0.9.7-distilled-fp8.safetensors"),
    );
    // The link resolves: ComfyUI sees SwarmUI's SD3.5 folder among its checkpoints.
    same(
        &comfy.join("checkpoints/OfficialStableDiffusion/sd3.5_large.safetensors"),
        &sd.join("sd3.5_large.safetensors"),
    );
    let served = hub.served_bytes();

    // Idempotent: nothing moves again, and the plan says everything is in place.
    let again = json(&run(
        &hub,
        &home,
        &["fetch", "ai4artsed", "--root", r, "--json"],
    ));
    assert_eq!(again["complete"], true);
    assert_eq!(again["bytes_from_hf"], 0);
    assert_eq!(again["bytes_from_peers"], 0);
    assert_eq!(hub.served_bytes(), served, "a re-run went to HF");
    let plan = json(&run(
        &hub,
        &home,
        &["fetch", "ai4artsed", "--root", r, "--dry-run", "--json"],
    ));
    for e in plan["entries"].as_array().unwrap() {
        for f in e["files"].as_array().unwrap() {
            assert_eq!(f["origin"], "in-place", "{plan}");
        }
    }
    assert_eq!(plan["links"][0]["already"], true);
}

#[test]
fn a_bundle_from_hf_and_a_peer_into_a_nested_root_with_a_link() {
    let tmp = tempfile::tempdir().unwrap();
    let repos = make_repos(&tmp.path().join("repos"));
    let hub = serve(tmp.path(), &repos);
    // A peer holding a mesh model (a LoRA folder).
    let lora = tmp.path().join("lora");
    write_file(&lora.join("style.safetensors"), 70_001, 7);
    write_file(&lora.join("sub/readme.txt"), 100, 8);
    let seed_home = tmp.path().join("seed");
    add(&seed_home, None, &lora, "lab-lora");
    let seed = NodeProc::start(&seed_home, None, "127.0.0.1", &[]).unwrap();

    let root = tmp.path().join("a/b/c/root");
    let config = tmp.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[bundles.lab]
root = "{}"
files = [
  {{ model = "sd3.5_large", to = "Models/Stable-Diffusion/SD35/" }},
  {{ model = "{SD}", include = ["text_encoders/*"], to = "comfy/models/clip/" }},
  {{ model = "lab-lora", to = "Models/Lora/lab/" }},
]
links = [ {{ path = "comfy/models/checkpoints/SD35", target = "../../../Models/Stable-Diffusion/SD35" }} ]
"#,
            root.display()
        ),
    )
    .unwrap();
    let home = tmp.path().join("node");
    let peer = seed.listen.to_string();
    let base = [
        "--config",
        config.to_str().unwrap(),
        "fetch",
        "lab",
        "--peer",
        &peer,
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };

    let plan = json(&run(&hub, &home, &strs(&with(&["--dry-run", "--json"]))));
    let mut planned: Vec<(String, String)> = plan["entries"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["files"].as_array().unwrap())
        .map(|f| {
            let path = f["path"].as_str().unwrap();
            let rel = Path::new(path).strip_prefix(&root).unwrap();
            (
                rel.display().to_string(),
                f["origin"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    planned.sort();
    let expect = [
        ("Models/Lora/lab/style.safetensors", "peer"),
        ("Models/Lora/lab/sub/readme.txt", "peer"),
        ("Models/Stable-Diffusion/SD35/sd3.5_large.safetensors", "hf"),
        ("comfy/models/clip/text_encoders/clip_g.safetensors", "hf"),
        (
            "comfy/models/clip/text_encoders/t5xxl_fp16.safetensors",
            "hf",
        ),
    ];
    let expect: Vec<(String, String)> = expect
        .iter()
        .map(|(p, o)| (p.to_string(), o.to_string()))
        .collect();
    assert_eq!(planned, expect, "the dry run must list every file");

    let done = run(&hub, &home, &strs(&with(&["--json"])));
    assert!(done.status.success());
    let report = json(&done);
    assert_eq!(report["complete"], true);
    assert!(report["bytes_from_peers"].as_u64().unwrap() >= 70_101);
    eprintln!("{}", find(&root));
    let sd = &repos[0].1;
    same(
        &root.join("Models/Stable-Diffusion/SD35/sd3.5_large.safetensors"),
        &sd.join("sd3.5_large.safetensors"),
    );
    same(
        &root.join("comfy/models/clip/text_encoders/t5xxl_fp16.safetensors"),
        &sd.join("text_encoders/t5xxl_fp16.safetensors"),
    );
    assert_same_tree(&lora, &root.join("Models/Lora/lab"));
    same(
        &root.join("comfy/models/checkpoints/SD35/sd3.5_large.safetensors"),
        &sd.join("sd3.5_large.safetensors"),
    );
    assert!(
        std::fs::symlink_metadata(root.join("comfy/models/checkpoints/SD35"))
            .unwrap()
            .file_type()
            .is_symlink()
    );

    let served = hub.served_bytes();
    let again = json(&run(&hub, &home, &strs(&with(&["--json"]))));
    assert_eq!(again["complete"], true);
    assert_eq!(again["bytes_from_peers"], 0, "a re-run moved bytes");
    assert_eq!(again["bytes_from_hf"], 0, "a re-run moved bytes");
    assert_eq!(hub.served_bytes(), served);
}

#[test]
fn files_already_in_place_are_adopted_and_served_to_peers() {
    let tmp = tempfile::tempdir().unwrap();
    let repos = make_repos(&tmp.path().join("repos"));
    let sd = repos[0].1.clone();
    let hub = serve(tmp.path(), &repos);

    // A machine that already has the files (copied by rsync, say): nothing is fetched.
    let home = tmp.path().join("has-them");
    let out = tmp.path().join("out");
    copy_tree(&sd, &out);
    let run1 = run(
        &hub,
        &home,
        &["fetch", SD, "--to", out.to_str().unwrap(), "--json"],
    );
    assert!(run1.status.success());
    let report = json(&run1);
    assert_eq!(report["bytes_from_hf"], 0);
    assert_eq!(report["bytes_from_peers"], 0);
    assert_eq!(report["in_place"].as_array().unwrap().len(), 4, "{report}");
    assert_eq!(hub.served_bytes(), 0, "adopted files were fetched");
    assert_same_tree(&sd, &out);

    // That node now serves them: a peer gets every byte from it, none from HF.
    let node = NodeProc::start(&home, None, "127.0.0.1", &[]).unwrap();
    let peer_out = tmp.path().join("peer-out");
    let peer = node.listen.to_string();
    let run2 = run(
        &hub,
        &tmp.path().join("peer"),
        &[
            "fetch",
            SD,
            "--peer",
            &peer,
            "--to",
            peer_out.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(run2.status.success());
    assert_eq!(json(&run2)["bytes_from_hf"], 0);
    assert_eq!(hub.served_bytes(), 0);
    assert_same_tree(&sd, &peer_out);

    // A file of the right size with other bytes is replaced atomically, and the report says so.
    let home3 = tmp.path().join("wrong");
    let out3 = tmp.path().join("out3");
    copy_tree(&sd, &out3);
    let clip = out3.join("text_encoders/clip_g.safetensors");
    write_file(&clip, 300_000, 99);
    let run3 = run(
        &hub,
        &home3,
        &["fetch", SD, "--to", out3.to_str().unwrap(), "--json"],
    );
    assert!(run3.status.success());
    let report = json(&run3);
    assert_eq!(report["bytes_from_hf"], 300_000);
    assert_eq!(report["replaced"][0], clip.to_str().unwrap());
    assert_same_tree(&sd, &out3);

    // A mesh model: the BLAKE3 root decides.
    let model = tmp.path().join("model");
    write_file(&model.join("w.bin"), (1 << 20) + 5, 11);
    let seed_home = tmp.path().join("seed");
    add(&seed_home, None, &model, "weights");
    let seed = NodeProc::start(&seed_home, None, "127.0.0.1", &[]).unwrap();
    let out4 = tmp.path().join("out4");
    copy_tree(&model, &out4);
    let run4 = run(
        &hub,
        &tmp.path().join("mesh-adopt"),
        &[
            "fetch",
            "weights",
            "--peer",
            &seed.listen.to_string(),
            "--to",
            out4.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(run4.status.success());
    let report = json(&run4);
    assert_eq!(report["bytes_from_peers"], 0);
    assert_eq!(report["in_place"][0], "w.bin");
}

#[test]
fn symlinks_leading_out_of_the_target_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_file(&model.join("sub/w.bin"), 50_000, 1);
    write_file(&model.join("top.bin"), 1000, 2);
    let seed_home = tmp.path().join("seed");
    add(&seed_home, None, &model, "m");
    let seed = NodeProc::start(&seed_home, None, "127.0.0.1", &[]).unwrap();
    let peer = seed.listen.to_string();

    // A symlinked sub-directory inside --to.
    let outside = tmp.path().join("outside");
    write_file(&outside.join("w.bin"), 10, 3);
    let before = std::fs::read(outside.join("w.bin")).unwrap();
    let to = tmp.path().join("to");
    std::fs::create_dir_all(&to).unwrap();
    symlink(&outside, to.join("sub")).unwrap();
    let home = tmp.path().join("node");
    let out = mesh(
        &home,
        None,
        &["fetch", "m", "--peer", &peer, "--to", to.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(6));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("symlink") && stderr.contains("outside"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(outside.join("w.bin")).unwrap(), before);
    assert_eq!(list_files(&outside), vec!["w.bin".to_string()]);

    // A symlinked component at the top of a bundle's root.
    let outside2 = tmp.path().join("outside2");
    std::fs::create_dir_all(&outside2).unwrap();
    let root = tmp.path().join("r/root");
    std::fs::create_dir_all(&root).unwrap();
    symlink(&outside2, root.join("Models")).unwrap();
    let config = tmp.path().join("config.toml");
    std::fs::write(
        &config,
        "[bundles.b]\nfiles = [ { model = \"m\", to = \"Models/x/\" } ]\n",
    )
    .unwrap();
    let out = mesh(
        &home,
        None,
        &[
            "--config",
            config.to_str().unwrap(),
            "fetch",
            "b",
            "--root",
            root.to_str().unwrap(),
            "--peer",
            &peer,
        ],
    );
    assert_eq!(out.status.code(), Some(6));
    assert!(list_files(&outside2).is_empty(), "wrote outside the root");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not every file"));
}

#[test]
fn app_layouts_put_files_in_the_apps_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let repos = make_repos(&tmp.path().join("repos"));
    let sd = repos[0].1.clone();
    let hub = serve(tmp.path(), &repos);
    let home = tmp.path().join("node");
    let comfy = tmp.path().join("ComfyUI");
    let c = comfy.to_str().unwrap();
    let out = run(
        &hub,
        &home,
        &["fetch", "clip_g", "--layout", "comfyui", "--to", c],
    );
    assert!(out.status.success());
    same(
        &comfy.join("models/clip/clip_g.safetensors"),
        &sd.join("text_encoders/clip_g.safetensors"),
    );
    let out = run(
        &hub,
        &home,
        &["fetch", "sd3.5_large", "--layout", "comfyui", "--to", c],
    );
    assert!(out.status.success());
    same(
        &comfy.join("models/checkpoints/sd3.5_large.safetensors"),
        &sd.join("sd3.5_large.safetensors"),
    );
    let swarm = tmp.path().join("SwarmUI");
    let s = swarm.to_str().unwrap();
    let out = run(
        &hub,
        &home,
        &["fetch", "sd3.5_large", "--layout", "swarmui", "--to", s],
    );
    assert!(out.status.success());
    same(
        &swarm.join("Models/Stable-Diffusion/sd3.5_large.safetensors"),
        &sd.join("sd3.5_large.safetensors"),
    );
    // A repo says nothing about its kind: --kind does, or the fetch refuses.
    let ltx = LTX;
    let refused = run(
        &hub,
        &home,
        &["fetch", ltx, "--layout", "comfyui", "--to", c],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--kind"));
    let out = run(
        &hub,
        &home,
        &[
            "fetch",
            ltx,
            "--layout",
            "comfyui",
            "--kind",
            "diffusion-model",
            "--to",
            c,
        ],
    );
    assert!(out.status.success());
    assert!(comfy
        .join("models/diffusion_models/ltxv-13b-0.9.7-distilled-fp8.safetensors")
        .is_file());
}

fn copy_tree(from: &Path, to: &Path) {
    for f in list_files(from) {
        let dest = to.join(&f);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(from.join(&f), dest).unwrap();
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}
