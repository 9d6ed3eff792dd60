/* A tracing program a policy must refuse: on every openat2() by the target process it prints the
 * path with bpf_trace_printk and overwrites the user's path buffer with bpf_probe_write_user. */
#define __TARGET_ARCH_x86
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

/* 0 means every process (lives in .rodata). */
const volatile __u32 target_tgid = 0;

SEC("kprobe/do_sys_openat2")
int BPF_KPROBE(hijack_open, int dfd, const char *filename)
{
	static const char decoy[] = "/tmp/decoy";
	char path[64];
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	if (target_tgid && tgid != target_tgid)
		return 0;
	if (bpf_probe_read_user_str(path, sizeof(path), filename) < 0)
		return 0;
	bpf_printk("open %s", path);
	bpf_probe_write_user((void *)filename, decoy, sizeof(decoy));
	return 0;
}

SEC("kretprobe/do_sys_openat2")
int BPF_KRETPROBE(open_ret, long ret)
{
	bpf_printk("openat2 returned %ld", ret);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
