#include "textflag.h"

// func addF32AVX2(d, s []float32)
// d[i] = d[i] + s[i] for i < len(d); len(s) >= len(d). Each lane is one
// IEEE single-precision add, exactly what the scalar loop computes.
TEXT ·addF32AVX2(SB), NOSPLIT, $0-48
	MOVQ d_base+0(FP), DI
	MOVQ d_len+8(FP), CX
	MOVQ s_base+24(FP), SI
	MOVQ CX, BX
	SHRQ $5, BX
	JZ   f32tail
f32loop:
	VMOVUPS 0(DI), Y0
	VMOVUPS 32(DI), Y1
	VMOVUPS 64(DI), Y2
	VMOVUPS 96(DI), Y3
	VADDPS  0(SI), Y0, Y0
	VADDPS  32(SI), Y1, Y1
	VADDPS  64(SI), Y2, Y2
	VADDPS  96(SI), Y3, Y3
	VMOVUPS Y0, 0(DI)
	VMOVUPS Y1, 32(DI)
	VMOVUPS Y2, 64(DI)
	VMOVUPS Y3, 96(DI)
	ADDQ    $128, DI
	ADDQ    $128, SI
	DECQ    BX
	JNZ     f32loop
	VZEROUPPER
f32tail:
	ANDQ $31, CX
	JZ   f32done
f32one:
	MOVSS 0(DI), X0
	ADDSS 0(SI), X0
	MOVSS X0, 0(DI)
	ADDQ  $4, DI
	ADDQ  $4, SI
	DECQ  CX
	JNZ   f32one
f32done:
	RET

// func addF64AVX2(d, s []float64)
TEXT ·addF64AVX2(SB), NOSPLIT, $0-48
	MOVQ d_base+0(FP), DI
	MOVQ d_len+8(FP), CX
	MOVQ s_base+24(FP), SI
	MOVQ CX, BX
	SHRQ $4, BX
	JZ   f64tail
f64loop:
	VMOVUPD 0(DI), Y0
	VMOVUPD 32(DI), Y1
	VMOVUPD 64(DI), Y2
	VMOVUPD 96(DI), Y3
	VADDPD  0(SI), Y0, Y0
	VADDPD  32(SI), Y1, Y1
	VADDPD  64(SI), Y2, Y2
	VADDPD  96(SI), Y3, Y3
	VMOVUPD Y0, 0(DI)
	VMOVUPD Y1, 32(DI)
	VMOVUPD Y2, 64(DI)
	VMOVUPD Y3, 96(DI)
	ADDQ    $128, DI
	ADDQ    $128, SI
	DECQ    BX
	JNZ     f64loop
	VZEROUPPER
f64tail:
	ANDQ $15, CX
	JZ   f64done
f64one:
	MOVSD 0(DI), X0
	ADDSD 0(SI), X0
	MOVSD X0, 0(DI)
	ADDQ  $8, DI
	ADDQ  $8, SI
	DECQ  CX
	JNZ   f64one
f64done:
	RET
