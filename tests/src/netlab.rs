//! A simulated LAN: N hosts in network namespaces on one bridge, each host's link shaped to a
//! rate both ways with `tbf` (this kernel has no netem). The same topology as
//! `shared/lab/netlab.sh`, owned by a value that tears it down when dropped, even when a test
//! panics.
//!
//! Host `i` (1-based) is namespace `{prefix}-h{i}` with address `{net}.{i}/24`; the bridge lives
//! in `{prefix}-sw`. Give every concurrent lab its own prefix. Labs never share a bridge, so
//! their nets may overlap. `MESH_NETLAB_TAG` (a letter or two) is put in front of every
//! prefix, so that two checkouts can run their namespace tests on one machine at once.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// A running lab; dropping it deletes every namespace it made.
pub struct NetLab {
    prefix: String,
    net: String,
    hosts: usize,
}

/// Whether this process can build a lab (root, with `ip` and `tc`). Prints why not.
pub fn available() -> bool {
    let tools = ["ip", "tc"].iter().all(|t| {
        Command::new(t)
            .arg("-V")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    crate::prereq::is_root() && tools
}

impl NetLab {
    /// Builds `hosts` hosts at `rate` (tc syntax, e.g. `50mbit`); `None` leaves links unshaped.
    pub fn up(prefix: &str, net: &str, hosts: usize, rate: Option<&str>) -> Result<Self> {
        let tag = std::env::var("MESH_NETLAB_TAG").unwrap_or_default();
        if tag.len() > 2 || !tag.chars().all(|c| c.is_ascii_lowercase()) {
            bail!(
                "MESH_NETLAB_TAG must be one or two lowercase letters (interface names are short)"
            );
        }
        let prefix = &format!("{tag}{prefix}");
        let lab = Self {
            prefix: prefix.to_string(),
            net: net.to_string(),
            hosts,
        };
        lab.teardown();
        let sw = format!("{prefix}-sw");
        run(&["ip", "netns", "add", &sw])?;
        ipv4_only(&sw)?;
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        run(&["ip", "-n", &sw, "link", "set", "lo", "up"])?;
        for i in 1..=hosts {
            let h = lab.ns(i);
            let (v, p) = (format!("{prefix}v{i}"), format!("{prefix}p{i}"));
            run(&["ip", "netns", "add", &h])?;
            ipv4_only(&h)?;
            run(&[
                "ip", "link", "add", &v, "netns", &h, "type", "veth", "peer", "name", &p, "netns",
                &sw,
            ])?;
            run(&["ip", "-n", &h, "link", "set", "lo", "up"])?;
            run(&["ip", "-n", &h, "link", "set", &v, "name", "eth0"])?;
            run(&[
                "ip",
                "-n",
                &h,
                "addr",
                "add",
                &format!("{}/24", lab.addr(i)),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &h, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &h, "link", "set", "eth0", "multicast", "on"])?;
            let _ = run(&["ip", "-n", &h, "route", "add", "224.0.0.0/4", "dev", "eth0"]);
            run(&["ip", "-n", &sw, "link", "set", &p, "master", "br0"])?;
            run(&["ip", "-n", &sw, "link", "set", &p, "up"])?;
            if let Some(rate) = rate {
                let burst = (rate_bits(rate)? / 8 / 250).max(32768).to_string();
                let tbf = [
                    "root", "tbf", "rate", rate, "burst", &burst, "latency", "50ms",
                ];
                let mut host = vec![
                    "ip", "netns", "exec", &h, "tc", "qdisc", "add", "dev", "eth0",
                ];
                host.extend(tbf);
                run(&host)?;
                let mut switch = vec!["ip", "netns", "exec", &sw, "tc", "qdisc", "add", "dev", &p];
                switch.extend(tbf);
                run(&switch)?;
            }
        }
        Ok(lab)
    }

    /// Shapes host `i`'s link (both ways) to `rate` instead of the lab's rate.
    pub fn set_rate(&self, i: usize, rate: &str) -> Result<()> {
        let burst = (rate_bits(rate)? / 8 / 250).max(32768).to_string();
        let tbf = [
            "root", "tbf", "rate", rate, "burst", &burst, "latency", "50ms",
        ];
        let (h, sw, p) = (
            self.ns(i),
            format!("{}-sw", self.prefix),
            format!("{}p{i}", self.prefix),
        );
        for (ns, dev) in [(h.as_str(), "eth0"), (sw.as_str(), p.as_str())] {
            let mut cmd = vec![
                "ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev,
            ];
            cmd.extend(tbf);
            run(&cmd)?;
        }
        Ok(())
    }

    /// Sets every link's MTU (the hosts' and the switch's ends) to `mtu`: 9,000 makes a
    /// jumbo-frame LAN.
    pub fn set_mtu(&self, mtu: u32) -> Result<()> {
        let (sw, mtu) = (format!("{}-sw", self.prefix), mtu.to_string());
        for i in 1..=self.hosts {
            let p = format!("{}p{i}", self.prefix);
            run(&["ip", "-n", &self.ns(i), "link", "set", "eth0", "mtu", &mtu])?;
            run(&["ip", "-n", &sw, "link", "set", &p, "mtu", &mtu])?;
        }
        run(&["ip", "-n", &sw, "link", "set", "br0", "mtu", &mtu])
    }

    /// Host `i`'s namespace name.
    pub fn ns(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix)
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        format!("{}.{i}", self.net)
    }

    /// Number of hosts.
    pub fn hosts(&self) -> usize {
        self.hosts
    }

    /// What host `i`'s shaped links carried so far: `(uplink, downlink)`, as counted by their
    /// `tbf` qdiscs (bytes on the wire including Ethernet headers, and packets dropped).
    pub fn link_counters(&self, i: usize) -> Result<(LinkCounters, LinkCounters)> {
        let up = qdisc_counters(&self.ns(i), "eth0")?;
        let down = qdisc_counters(
            &format!("{}-sw", self.prefix),
            &format!("{}p{i}", self.prefix),
        )?;
        Ok((up, down))
    }

    /// A command run inside host `i`.
    pub fn cmd(&self, i: usize, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(i), program]);
        cmd
    }

    fn teardown(&self) {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        let list = String::from_utf8_lossy(&out.stdout).into_owned();
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.starts_with(&format!("{}-", self.prefix)) {
                // Processes left in a namespace would keep it alive: end them first.
                if let Ok(pids) = Command::new("ip").args(["netns", "pids", ns]).output() {
                    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                }
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Bytes sent and packets dropped by one qdisc.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkCounters {
    /// Bytes sent.
    pub bytes: u64,
    /// Packets (or GSO batches) dropped.
    pub dropped: u64,
}

impl std::ops::Sub for LinkCounters {
    type Output = Self;

    fn sub(self, earlier: Self) -> Self {
        Self {
            bytes: self.bytes - earlier.bytes,
            dropped: self.dropped - earlier.dropped,
        }
    }
}

/// Parses `tc -s qdisc show dev DEV` in namespace `ns`: "Sent B bytes P pkt (dropped D, ...".
fn qdisc_counters(ns: &str, dev: &str) -> Result<LinkCounters> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev])
        .output()
        .context("running tc")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    let after = |word: &str| -> Result<u64> {
        let at = words
            .iter()
            .position(|w| *w == word)
            .with_context(|| format!("no '{word}' in tc output for {dev}: {text}"))?;
        let value = words.get(at + 1).context("tc output ends early")?;
        value
            .trim_end_matches(',')
            .parse()
            .with_context(|| format!("tc counter '{value}'"))
    };
    Ok(LinkCounters {
        bytes: after("Sent")?,
        dropped: after("(dropped")?,
    })
}

/// Turns IPv6 off in namespace `ns` before its interfaces exist. mesh runs on IPv4 here, and
/// the kernel's IPv6 router solicitations and address probes would otherwise be counted as
/// the nodes' traffic (about 80 B/s per host at 32 hosts).
fn ipv4_only(ns: &str) -> Result<()> {
    let off = "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && \
               echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6";
    run(&["ip", "netns", "exec", ns, "sh", "-c", off])
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `50mbit` -> 50_000_000.
pub fn rate_bits(rate: &str) -> Result<u64> {
    let r = rate.to_ascii_lowercase();
    let r = r
        .strip_suffix("bit")
        .context("rate must end in bit, e.g. 50mbit")?;
    let (num, mult) = match r.chars().last() {
        Some('k') => (&r[..r.len() - 1], 1e3),
        Some('m') => (&r[..r.len() - 1], 1e6),
        Some('g') => (&r[..r.len() - 1], 1e9),
        _ => (r, 1.0),
    };
    Ok((num.parse::<f64>().context("rate number")? * mult) as u64)
}
