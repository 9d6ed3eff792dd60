/* A Retina-like flow observer (TC): emits one event per sampled IPv4 packet to a ring buffer. */
#include "common.h"
#include <linux/pkt_cls.h>

struct flow_event {
	__u64 ts_ns;
	__u32 ifindex;
	__u32 len;
	struct flow_key flow;
	__u8 direction;
	__u8 tcp_flags;
	__u8 pad[6];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} flow_events SEC(".maps");

/* Emit one event every sample_rate packets (lives in .data). */
volatile __u32 sample_rate = 1;
/* Events lost because the ring buffer was full (lives in .bss). */
__u64 lost_events;
__u64 seen_packets;

static __always_inline int observe(struct __sk_buff *skb, __u8 direction)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct flow_event *ev;
	struct iphdr *iph;
	__u64 seen;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	iph = (void *)(eth + 1);
	if ((void *)(iph + 1) > data_end)
		return TC_ACT_UNSPEC;
	seen = __sync_fetch_and_add(&seen_packets, 1);
	if (sample_rate > 1 && seen % sample_rate)
		return TC_ACT_UNSPEC;

	ev = bpf_ringbuf_reserve(&flow_events, sizeof(*ev), 0);
	if (!ev) {
		__sync_fetch_and_add(&lost_events, 1);
		return TC_ACT_UNSPEC;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = bpf_ktime_get_ns();
	ev->ifindex = skb->ifindex;
	ev->len = skb->len;
	ev->direction = direction;
	ev->flow.saddr = iph->saddr;
	ev->flow.daddr = iph->daddr;
	ev->flow.proto = iph->protocol;
	if (iph->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(iph + 1);

		if ((void *)(tcp + 1) <= data_end) {
			ev->flow.sport = tcp->source;
			ev->flow.dport = tcp->dest;
			ev->tcp_flags = ((__u8 *)tcp)[13];
		}
	} else if (iph->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(iph + 1);

		if ((void *)(udp + 1) <= data_end) {
			ev->flow.sport = udp->source;
			ev->flow.dport = udp->dest;
		}
	}
	bpf_ringbuf_submit(ev, 0);
	return TC_ACT_UNSPEC;
}

SEC("classifier")
int observe_ingress(struct __sk_buff *skb)
{
	return observe(skb, 0);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
