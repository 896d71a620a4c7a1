/*
 * ftvm built-in test guest: spin mode, a compute loop that makes no VM exit.
 *
 * `spin=N` (CPL0) and `spin3=N` (CPL3) run spin_body(): it keeps rewriting a
 * buffer (`spinkb` KiB, default 256) with a xorshift64 chain until the timer
 * ISR has counted N more ticks, reading the tick counter from memory. The
 * loop uses plain integer instructions and ordinary memory accesses only: no
 * port I/O, hlt, rdtsc, cpuid or int, so nothing in it exits to the VMM. A
 * VMM that delivers interrupts only at exits never ends it; one that kicks
 * the vCPU and injects the tick where it stopped does.
 *
 * CPL3: the guest loads its own GDT (the VMM's two kernel descriptors plus
 * 64-bit user code and data, DPL3, and a TSS whose RSP0 is a kernel
 * interrupt stack), and its own page tables (identity map of the first
 * 4 GiB with 2 MiB pages, the U bit set on the pages from 0 to the end of
 * the spin buffer). user_call() (start.S) enters CPL3 with iretq; interrupts
 * taken there switch to RSP0 and return with iretq. The user code leaves
 * CPL3 by executing `ud2` at user_exit_ud2: spin_user_exit() recognises
 * that #UD and rewrites the exception frame so that its iretq resumes the
 * kernel right after user_call().
 */
#include "ftvm.h"

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS (0x18 | 3)
#define USER_CS (0x20 | 3)
#define TSS_SEL 0x28

#define VEC_UD 6

/* xorshift steps between two looks at the tick counter. */
#define SPIN_ROUND 64
/* The strided write moves one page and one word on: every page in turn. */
#define SPIN_STRIDE_WORDS (4096 / 8 + 1)

#define PAGE_2M (2ull << 20)
#define PTE_P 0x1ull
#define PTE_RW 0x2ull
#define PTE_U 0x4ull
#define PTE_PS 0x80ull
#define PD_COUNT 4	/* 4 GiB, as the VMM maps it */

#define USER_STACK_SIZE 16384
#define KERNEL_INT_STACK_SIZE 16384

/* Not zeroed at boot (see link.ld): filled in before use, in spin3 only. */
#define NOINIT __attribute__((section(".noinit")))

struct spin_job {
	u64 *buf;
	u64 mask;	/* words - 1; words is a power of two */
	u64 seed;
	u64 target;	/* ticks to count */
	/* results */
	u64 seen;	/* ticks counted when the loop stopped */
	u64 iters;	/* rounds of SPIN_ROUND steps */
	u32 sum;	/* checksum of the buffer afterwards */
};

struct tss64 {
	u32 reserved0;
	u64 rsp0, rsp1, rsp2;
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
} __attribute__((packed));

struct desc_ptr {
	u16 limit;
	u64 base;
} __attribute__((packed));

extern const char __image_end[];
extern const char user_exit_ud2[];
extern const char user_return[];
/* start.S: enters fn(arg) at CPL3 on user_rsp; returns once the user code
 * reached user_exit_ud2 and spin_user_exit() sent it back. */
void user_call(void (*fn)(struct spin_job *), struct spin_job *arg, u64 user_rsp);
/* Kernel state saved by user_call(), restored through spin_user_exit(). */
u64 user_saved_rsp;
u64 user_saved_rflags;

static struct spin_job job;
static bool user_active;	/* between user_call() and its planned exit */
static bool cpl3_ready;

static u64 gdt[7] __attribute__((aligned(16)));
static struct tss64 tss __attribute__((aligned(16)));

static u64 pml4[512] NOINIT __attribute__((aligned(4096)));
static u64 pdpt[512] NOINIT __attribute__((aligned(4096)));
static u64 pd[PD_COUNT][512] NOINIT __attribute__((aligned(4096)));
static u8 user_stack[USER_STACK_SIZE] NOINIT __attribute__((aligned(16)));
static u8 kernel_int_stack[KERNEL_INT_STACK_SIZE] NOINIT __attribute__((aligned(16)));

/*
 * The loop itself, at CPL0 or CPL3: only integer arithmetic and memory
 * accesses. Everything it produces is a function of the job and of where
 * the timer interrupts arrive.
 */
__attribute__((noinline)) static void spin_body(struct spin_job *j)
{
	u64 *buf = j->buf;
	u64 mask = j->mask;
	u64 x = j->seed, pos = 0, iters = 0, start, now, i, h;
	u32 k;

	for (i = 0; i <= mask; i++)
		buf[i] = (i * 0x9e3779b97f4a7c15ull) ^ x;

	start = ticks;
	do {
		for (k = 0; k < SPIN_ROUND; k++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			buf[x & mask] += x;	/* anywhere */
			buf[pos] ^= x;		/* the next page */
			pos = (pos + SPIN_STRIDE_WORDS) & mask;
		}
		iters++;
		now = ticks;		/* volatile: written by the ISR */
	} while (now - start < j->target);

	/* FNV-1a-like over the 64-bit words, folded to 32 bits. */
	h = 0xcbf29ce484222325ull;
	for (i = 0; i <= mask; i++) {
		h ^= buf[i];
		h *= 0x100000001b3ull;
	}
	j->seen = now - start;
	j->iters = iters;
	j->sum = (u32)(h ^ (h >> 32));
}

static u64 tss_desc_lo(u64 base, u32 limit)
{
	return (u64)(limit & 0xffff) | ((base & 0xffffff) << 16) |
	       (0x89ull << 40) |			/* present, DPL0, 64-bit TSS (available) */
	       ((u64)((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
}

/*
 * GDT, TSS and page tables for CPL3; once per boot. `user_end`: the U bit
 * is set on every 2 MiB page below it (guest image, stacks and buffer).
 */
static void cpl3_setup(u64 user_end)
{
	struct desc_ptr p;
	u64 i, j;

	tss.rsp0 = (u64)(kernel_int_stack + KERNEL_INT_STACK_SIZE);
	tss.iomap_base = sizeof(tss);	/* no I/O bitmap: CPL3 port I/O faults */

	gdt[0] = 0;
	gdt[1] = 0x00af9a000000ffffull;	/* 0x08 kernel code: 64-bit, DPL0 (as the VMM's) */
	gdt[2] = 0x00cf92000000ffffull;	/* 0x10 kernel data (as the VMM's) */
	gdt[3] = 0x00cff2000000ffffull;	/* 0x18 user data, DPL3 */
	gdt[4] = 0x00affa000000ffffull;	/* 0x20 user code: 64-bit, DPL3 */
	gdt[5] = tss_desc_lo((u64)&tss, sizeof(tss) - 1);	/* 0x28 TSS */
	gdt[6] = (u64)&tss >> 32;

	for (i = 0; i < 512; i++) {
		pml4[i] = 0;
		pdpt[i] = i < PD_COUNT ? (u64)pd[i] | PTE_P | PTE_RW | PTE_U : 0;
	}
	pml4[0] = (u64)pdpt | PTE_P | PTE_RW | PTE_U;
	for (i = 0; i < PD_COUNT; i++) {
		for (j = 0; j < 512; j++) {
			u64 a = (i * 512 + j) * PAGE_2M;

			pd[i][j] = a | PTE_P | PTE_RW | PTE_PS | (a < user_end ? PTE_U : 0);
		}
	}

	p.limit = sizeof(gdt) - 1;
	p.base = (u64)gdt;
	/* Same 0x08/0x10 descriptors as before: CS and SS need no reload. */
	__asm__ volatile("lgdt %0" : : "m"(p) : "memory");
	__asm__ volatile("ltr %w0" : : "r"((u16)TSS_SEL) : "memory");
	__asm__ volatile("mov %0, %%cr3" : : "r"((u64)pml4) : "memory");
	cpl3_ready = true;
}

bool spin_user_exit(struct isr_frame *f)
{
	if (f->vector != VEC_UD || (f->cs & 3) != 3 || !user_active ||
	    f->rip != (u64)user_exit_ud2)
		return false;
	user_active = false;
	f->rip = (u64)user_return;
	f->cs = KERNEL_CS;
	f->rflags = user_saved_rflags;
	f->rsp = user_saved_rsp;
	f->ss = KERNEL_DS;
	return true;
}

static void spin_print_start(u32 cpl, u64 n, u64 kib)
{
	struct line l;

	line_reset(&l);
	line_str(&l, "[spin] cpl=");
	line_dec(&l, cpl, 0);
	line_str(&l, " start target=");
	line_dec(&l, n, 0);
	line_str(&l, " kib=");
	line_dec(&l, kib, 0);
	line_ch(&l, '\n');
	tx_line(&l);
}

void spin_run(u32 cpl, u64 n, u64 kib)
{
	u64 buf = ((u64)__image_end + PAGE_2M - 1) & ~(PAGE_2M - 1);
	struct line l;

	spin_print_start(cpl, n, kib);
	/* Everything out first: the UART has nothing to do during the spin,
	 * and the start line is visible even if the loop never ends. */
	tx_drain();

	job.buf = (u64 *)buf;
	job.mask = kib * 1024 / 8 - 1;
	job.seed = cpl == 3 ? 0x2545f4914f6cdd1dull : 0x9e3779b97f4a7c15ull;
	job.target = n;
	if (cpl == 3) {
		if (!cpl3_ready)
			cpl3_setup(buf + kib * 1024);
		user_active = true;
		user_call(spin_body, &job, (u64)(user_stack + USER_STACK_SIZE));
	} else {
		spin_body(&job);
	}

	line_reset(&l);
	line_str(&l, "[spin] cpl=");
	line_dec(&l, cpl, 0);
	line_str(&l, " ticks=");
	line_dec(&l, job.seen, 0);
	line_str(&l, " iters=");
	line_dec(&l, job.iters, 0);
	line_str(&l, " sum=");
	line_hex(&l, job.sum, 8);
	line_ch(&l, '\n');
	tx_line(&l);
}

u64 spin_buf_max_kib(u64 mem_bytes)
{
	u64 buf = ((u64)__image_end + PAGE_2M - 1) & ~(PAGE_2M - 1);

	return mem_bytes > buf ? (mem_bytes - buf) / 1024 : 0;
}
